"""Step 1: the byte-level BPE tokenizer. Each verification item is one test."""
import json
import os
import random
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.cli import UserError, run_main
from common.paths import REPO_ROOT
from step1_tokenizer import show_tokens, train_tokenizer
from step1_tokenizer.bpe import (
    DEFAULT_SPECIAL_TOKENS, ENDOFTEXT, GPT4_SPLIT_PATTERN, IM_END, IM_START, IMAGE,
    Tokenizer, load_tokenizer, train_bpe, train_bpe_textbook,
)

# Written for this test: English prose, Chinese, emoji and numbers, so that the
# tokenizer learns merges of whole words, of multi-byte characters and of digits.
SAMPLE_TEXT = (
    "The river flows past the old mill, and the miller's daughter counts 1234567 fish. "
    "She doesn't like rivers; she likes the mountains, where the air is cold and clear.\n"
    "河流流过古老的磨坊，磨坊主的女儿在数鱼。她喜欢山，那里的空气又冷又清新。\n"
    "Weather today: ☀️ then 🌧️ -- bring an umbrella ☂️! Temperatures 12°C to 18°C.\n\n"
)
TINY_VOCAB = 256 + 3 + len(DEFAULT_SPECIAL_TOKENS)  # room for exactly 3 merges


@pytest.fixture(scope="module")
def tok():
    """A small tokenizer trained in well under a second."""
    return train_bpe([SAMPLE_TEXT * 20, SAMPLE_TEXT.upper()], vocab_size=500)


def error_line(capsys, main, argv):
    """Run a script's main as the command line would; return its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err  # one line, no traceback
    return err


# ----------------------------------------------------------------------------
# Verification list


@pytest.mark.verifies(1, "decode(encode(s)) == s for any Unicode string: English, Chinese, emoji, "
                         "control characters, long runs of spaces, the empty string, and random strings "
                         "from hypothesis")
@settings(max_examples=300, deadline=None)
@given(random_text=st.text())
def test_round_trip(tok, random_text):
    edge_cases = [
        "Hello, world! It's 2024-06-01.",
        "你好，世界。分词器把文字切成小块。",
        "👋🏽 family: 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵",
        "\x00\x01\t\r\n\x1b[31m\x7f\u200b\ufeff",
        " " * 1000 + "x" + "\n" * 50 + "\t \t",
        "",
        "<|endoftext|> in ordinary text",
        random_text,
    ]
    for text in edge_cases:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text, allowed_special="all")) == text


@pytest.mark.verifies(1, "Training on aaabdaaabac learns the merges aa, ab, (aa)(ab) and encodes it as "
                         "[258, 100, 258, 97, 99]")
def test_known_merges_and_ids():
    tok = train_bpe("aaabdaaabac", vocab_size=TINY_VOCAB)
    # merge 1: "aa" occurs 4 times -> 256; then "ab" and "(aa)a" tie with 2 each and
    # the smaller pair (97, 98) wins -> 257; then (256, 257) = "aaab" -> 258.
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert [tok.decode([i]) for i in (256, 257, 258)] == ["aa", "ab", "aaab"]
    assert tok.encode("bad") == [98, 97, 100]  # "ba" was never merged
    assert tok.vocab_size == 263
    assert tok.special_tokens == {ENDOFTEXT: 259, IM_START: 260, IM_END: 261, IMAGE: 262}


@pytest.mark.verifies(1, "Special tokens are single ids after the merges and come from their text only "
                         "when allowed")
def test_special_tokens(tok):
    first = 256 + len(tok.merges)
    assert tok.special_tokens == {ENDOFTEXT: first, IM_START: first + 1, IM_END: first + 2, IMAGE: first + 3}
    assert (tok.eot_id, tok.im_start_id, tok.im_end_id, tok.image_id) == (first, first + 1, first + 2, first + 3)
    assert tok.vocab_size == first + 4 == 500

    text = "<|im_start|>user\nhi<image><|im_end|><|endoftext|>"
    plain = tok.encode(text)  # default: special-token text is ordinary text
    assert not set(plain) & set(tok.special_tokens.values())
    assert plain == tok.encode(text, allowed_special="none") == tok.encode(text, allowed_special=set())
    assert tok.decode(plain) == text

    allowed = tok.encode(text, allowed_special="all")
    assert allowed == ([tok.im_start_id] + tok.encode("user\nhi") + [tok.image_id, tok.im_end_id, tok.eot_id])
    assert tok.decode(allowed) == text

    only_eot = tok.encode(text, allowed_special={ENDOFTEXT})
    assert only_eot == tok.encode("<|im_start|>user\nhi<image><|im_end|>") + [tok.eot_id]
    assert tok.encode("a<|endoftext|>", allowed_special=ENDOFTEXT)[-1] == tok.eot_id
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode("x", allowed_special={"<|nope|>"})


@pytest.mark.verifies(1, "Save and load give identical encodings")
def test_save_load(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.merges == tok.merges
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.pattern == tok.pattern == GPT4_SPLIT_PATTERN
    texts = [SAMPLE_TEXT, SAMPLE_TEXT.upper(), "<|im_start|>x<|im_end|>", "ünïcödé 12345678"]
    for text in texts:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert load_tokenizer(path).encode(SAMPLE_TEXT) == tok.encode(SAMPLE_TEXT)

    data = json.loads(path.read_text(encoding="utf-8"))  # readable for people, too
    assert (data["format"], data["version"]) == ("lm-tutorial-bpe-tokenizer", 1)
    assert data["merges"][0] == list(tok.merges[0])
    assert data["vocab"]["104"] == "h" and data["vocab"]["10"] == "\\u000a"
    assert data["vocab"][str(tok.eot_id)] == ENDOFTEXT
    assert len(data["vocab"]) == tok.vocab_size


@pytest.mark.verifies(1, "Training is deterministic: the same text gives the same merges, in any "
                         "document order and under any Python hash seed")
def test_deterministic():
    docs = [SAMPLE_TEXT, SAMPLE_TEXT.upper(), SAMPLE_TEXT.lower() * 3, "numbers 1234567890 " * 7]
    reference = train_bpe(docs, vocab_size=500).merges
    assert train_bpe(docs, vocab_size=500).merges == reference
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != docs and train_bpe(shuffled, vocab_size=500).merges == reference

    # a fresh interpreter per hash seed: str hashes (and so set orders) differ between them
    script = ("import json, sys; from step1_tokenizer.bpe import train_bpe; "
              "print(json.dumps(train_bpe(json.load(sys.stdin), vocab_size=500).merges))")
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, input=json.dumps(docs),
                             capture_output=True, text=True, check=True).stdout
        assert [tuple(p) for p in json.loads(out)] == reference


@pytest.mark.verifies(1, "Incremental training learns exactly the merges that recounting every pair after "
                         "each merge learns")
def test_incremental_equals_naive():
    text = SAMPLE_TEXT * 3 + SAMPLE_TEXT.upper() + "aaaa aaaaa bbbbbb 0000000 " * 4
    size = 256 + 150 + len(DEFAULT_SPECIAL_TOKENS)
    fast, textbook = train_bpe(text, vocab_size=size), train_bpe_textbook(text, vocab_size=size)
    assert len(fast.merges) == 150 and fast.merges == textbook.merges
    assert fast.encode(text) == textbook.encode(text)
    # several documents (pairs never span two of them) and other special tokens
    documents = [SAMPLE_TEXT, "aaabdaaabac", SAMPLE_TEXT.upper()]
    assert (train_bpe(documents, 300, special_tokens=["<a>"]).merges
            == train_bpe_textbook(documents, 300, special_tokens=["<a>"]).merges)
    # run out of pairs: the textbook loop stops too, and every chunk is one token
    small = "hello world 1234567890 hello world"
    assert train_bpe(small, vocab_size=10_000).merges == train_bpe_textbook(small, vocab_size=10_000).merges
    assert train_bpe_textbook("aaabdaaabac", 256 + 3 + 4).merges == [(97, 97), (97, 98), (256, 257)]


@pytest.mark.verifies(1, "Merges never cross pre-split chunks: words keep their leading space and numbers "
                         "split into groups of at most 3 digits")
def test_merges_stay_inside_chunks():
    text = "hello world 1234567890 hello world"
    tok = train_bpe(text, vocab_size=10_000)  # merge until nothing is left to merge
    ids = tok.encode(text)
    assert [tok.decode([i]) for i in ids] == [
        "hello", " world", " ", "123", "456", "789", "0", " hello", " world"]
    learned = [tok.decode([i]) for i in range(256, 256 + len(tok.merges))]
    assert max(len(run) for t in learned for run in re.findall(r"[0-9]+", t)) == 3
    assert not [t for t in learned if re.search(r"\S ", t)]  # no word end + next word's space


@pytest.mark.verifies(1, "Bad input gives one clear error line: empty text, non-UTF-8 file, too-small "
                         "vocab_size, missing, truncated or wrong-format tokenizer file")
def test_bad_input(tmp_path, capsys, tok):
    good = tmp_path / "good.txt"
    good.write_text(SAMPLE_TEXT, encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9\n".encode("latin-1"))
    out = ["--out", str(tmp_path / "t.json")]

    err = error_line(capsys, train_tokenizer.main, ["--input", str(empty)] + out)
    assert "empty.txt" in err and "no text" in err
    err = error_line(capsys, train_tokenizer.main, ["--input", str(latin1)] + out)
    assert "latin1.txt, line 1" in err and "not UTF-8" in err
    err = error_line(capsys, train_tokenizer.main, ["--input", str(good), "--vocab_size", "260"] + out)
    assert "vocab_size 260 is too small" in err and "256 byte tokens + 4 special tokens = 260" in err
    with pytest.raises(UserError, match="training text is empty"):
        train_bpe(["", ""], vocab_size=300)

    tok_file = tmp_path / "tok.json"
    tok.save(tok_file)
    truncated = tmp_path / "truncated.json"
    truncated.write_bytes(tok_file.read_bytes()[: tok_file.stat().st_size // 2])
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"model": "gpt", "weights": []}', encoding="utf-8")
    missing = tmp_path / "missing.json"
    run_fix = "run python step1_tokenizer/train_tokenizer.py"
    for path, problem in [(truncated, "is not a tokenizer file (invalid JSON"),
                          (wrong, "is not a tokenizer file (format None"),
                          (missing, "tokenizer file not found")]:
        err = error_line(capsys, show_tokens.main, ["--tokenizer", str(path)])
        assert str(path) in err and problem in err and err.rstrip().endswith(run_fix)


@pytest.mark.verifies(1, "train_tokenizer.py --quick trains on the quick generated corpus and writes the "
                         "tokenizer and its metrics under out/quick/, leaving a full run's out/tokenizer.json alone")
def test_train_script_quick(tmp_path, monkeypatch):
    import common.paths
    from common.world.corpus import default_documents

    monkeypatch.setattr(common.paths, "OUT_DIR", tmp_path)
    results = train_tokenizer.main(["--quick"])
    out = tmp_path / "quick" / "tokenizer.json"
    assert not (tmp_path / "tokenizer.json").exists() and not (tmp_path / "step1").exists()

    train_docs, heldout_docs = default_documents(quick=True)
    expected = train_bpe(train_docs, vocab_size=512)
    loaded = Tokenizer.load(out)
    assert loaded.vocab_size == results["vocab_size"] == 512
    assert loaded.merges == expected.merges  # exactly the text step 3 pretrains on
    metrics = json.loads((tmp_path / "quick" / "step1" / "metrics.json").read_text())
    assert metrics == results
    n_tokens = sum(len(loaded.encode(d)) for d in heldout_docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in heldout_docs)
    assert metrics["bytes_per_token"] == round(n_bytes / n_tokens, 3)
    assert metrics["bytes_per_token"] > 2.0  # 512 tokens already beat raw bytes (1.0) by far
    assert metrics["train_seconds"] > 0 and metrics["encode_mb_per_s"] > 0
    # a tokenizer written elsewhere (--out) leaves the tutorial tokenizer's figures as they are
    train_tokenizer.main(["--quick", "--vocab_size", "300", "--out", str(tmp_path / "other.json")])
    assert json.loads((tmp_path / "quick" / "step1" / "metrics.json").read_text()) == results


@pytest.mark.verifies(1, "show_tokens.py shows each token in brackets and names the Chinese characters "
                         "split across byte tokens")
def test_show_tokens(tmp_path, capsys):
    path = tmp_path / "tiny.json"
    train_bpe("aaabdaaabac", vocab_size=TINY_VOCAB).save(path)
    results = show_tokens.main(["aaab 中", "--tokenizer", str(path)])  # captured output is not a tty
    assert results == {"Text": [258, 32, 228, 184, 173]}
    assert capsys.readouterr().out.splitlines()[1:] == [
        "Text: 5 tokens for 8 bytes (1.60 bytes per token)",
        r"  [aaab][ ][\xe4][\xb8][\xad]",
        "  ids: [258, 32, 228, 184, 173]",
        "  characters split across byte tokens: 中 = e4 b8 ad",
    ]


# ----------------------------------------------------------------------------
# Further checks


def test_decode_replaces_invalid_utf8(tok):
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # half of 中
    assert tok.decode([0xE4, 0xB8, 0xAD]) == "中"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_step1_does_not_import_torch():
    script = ("import sys; import step1_tokenizer.bpe, step1_tokenizer.show_tokens; "
              "step1_tokenizer.bpe.train_bpe('abc abc', 300).encode('abc'); "
              "assert 'torch' not in sys.modules, 'step 1 imported torch'")
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=True)


def test_notebook_runs():
    from tests.notebooks import outputs_text, run_notebook

    notebook = run_notebook("step1_tokenizer/step1_tokenizer.ipynb")
    text = outputs_text(notebook)
    assert "[258, 100, 258, 97, 99]" in text
    assert "the cells above == train_bpe_textbook: True" in text  # the loop built in cells is bpe.py's
    assert "train_bpe_textbook == train_bpe:       True" in text
