"""Step 4: chat template, assistant-only loss, full SFT, LoRA, chat.

Everything runs in-process on tiny models: a byte-level tokenizer (no merges: one
character = one token, so positions can be written down by hand) for the mask,
and a small BPE tokenizer + 2-layer model saved to a temporary folder for the scripts.
"""
import io
import json
import math
import re
from collections import Counter

import pytest
import torch

from common.checkpoint import checkpoint_dict, load_checkpoint, load_model, save_checkpoint
from common.cli import UserError
from common.model import IGNORE_INDEX, ModelConfig, Transformer
from common.world.world import ask, build_world, generate_documents, split_facts
from step1_tokenizer.bpe import Tokenizer, train_bpe
from step2_model.inspect_model import count_trainable
from step3_pretrain.data import load_tokens, prepare
from step4_sft import data as sft_data, eval_sft, sft, train_lora, train_sft
from step4_sft.chat import ChatSession, chat_loop, fit_prompt, reply, stream_reply
from step4_sft.chat_template import decode_reply, encode_conversation, encode_prompt, shift_labels
from step4_sft.data import Example, collate, load_examples, mask_table, sft_batch
from step4_sft.lora import (LoRALinear, TokenRows, adapter_dict, apply_lora, load_adapter,
                            lora_layers, merge_lora, save_adapter, token_rows)
from step4_sft.tasks import final_number, held_out_name, make_datasets, score

CONVERSATION = [  # a system prompt and two user/assistant turns
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def byte_tok():
    """No merges: ids 0-255 are bytes, then <|endoftext|> 256, <|im_start|> 257, <|im_end|> 258, <image> 259."""
    return Tokenizer([])


@pytest.fixture(scope="module")
def tok():
    return train_bpe(generate_documents(build_world(0, "quick"), n_docs=80), vocab_size=256 + 4 + 500)


def tiny_config(vocab_size, **overrides):
    return ModelConfig(**{**dict(vocab_size=vocab_size, block_size=128, n_layer=2, n_head=4, n_kv_head=2,
                                 n_embd=32), **overrides})


@pytest.fixture(scope="module")
def files(tok, tmp_path_factory):
    """Tokenizer, a (random) base model, pretraining tokens to replay and the --quick conversation sets
    on disk, as the scripts want them."""
    root = tmp_path_factory.mktemp("step4")
    tok.save(root / "tokenizer.json")
    prepare(root, tokenizer_path=root / "tokenizer.json", quick=True)  # train.bin, val.bin, meta.json
    torch.manual_seed(0)
    save_checkpoint(checkpoint_dict(Transformer(tiny_config(tok.vocab_size))), root / "base.pt")
    sft_data.main(["--create_sample", "--quick", "--out", str(root)])
    return root


def script_args(files, out):
    return ["--quick", "--tokenizer", str(files / "tokenizer.json"), "--checkpoint", str(files / "base.pt"),
            "--data", str(files / "sft_train.jsonl"), "--eval_data", str(files / "sft_eval.jsonl"), "--out", str(out),
            "--replay_data", str(files)]


@pytest.fixture(scope="module")
def lora_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    result = train_lora.main(script_args(files, out) + ["--lora_r", "8", "--max_steps", "12"])
    return out, result


# ----------------------------------------------------------------------------- template and mask

@pytest.mark.verifies(4, "The loss mask equals the assistant spans position by position on a multi-turn "
                         "example with a system prompt")
def test_mask_equals_assistant_spans(byte_tok):
    ids, mask = encode_conversation(byte_tok, CONVERSATION)
    # every content starts with CONTENT_PREFIX, one space:
    # <|im_start|>system\n" Be kind."<|im_end|>\n = 19 tokens (0-18), the user turn " Hi" 11 (19-29),
    # <|im_start|>assistant\n = 30-40, " Yo" = 41-43, <|im_end|> = 44, \n = 45,
    # user " 2+2?" 46-58, <|im_start|>assistant\n = 59-69, " 4" = 70-71, <|im_end|> = 72, \n = 73.
    assert len(ids) == 74
    assert ids[30] == ids[59] == byte_tok.im_start_id
    assert bytes(ids[31:41]) == bytes(ids[60:70]) == b"assistant\n"
    assert ids[41:45] == [ord(" "), ord("Y"), ord("o"), byte_tok.im_end_id]
    assert ids[70:73] == [ord(" "), ord("4"), byte_tok.im_end_id]
    assert mask == [1 if pos in (41, 42, 43, 44, 70, 71, 72) else 0 for pos in range(74)]
    # after the one shift, position t is scored on ids[t+1]: the header's last token (the newline,
    # mask 0) is the position trained to write the answer's first token
    inputs, targets = shift_labels(torch.tensor(ids), torch.tensor(mask))
    assert inputs.tolist() == ids[:-1]
    expected = {40: ord(" "), 41: ord("Y"), 42: ord("o"), 43: byte_tok.im_end_id,
                69: ord(" "), 70: ord("4"), 71: byte_tok.im_end_id}
    assert targets.tolist() == [expected.get(t, IGNORE_INDEX) for t in range(73)]


@pytest.mark.verifies(4, "An answer that repeats a name from the question repeats its very tokens (the space "
                         "before every message), and the reply is shown without that space")
def test_answer_repeats_the_question_s_name_as_the_same_tokens(tok):
    # The reason for CONTENT_PREFIX: "Mirven" first on a line and " Mirven" mid-sentence are
    # different tokens. With the prefix, the answer's opening name is the question's own tokens.
    person = build_world(0, "quick").names("person")[0]
    question, answer = f"Where does {person} live?", f"{person} lives in a town."
    ids, mask = encode_conversation(tok, [{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}])
    name_ids, bare_ids = tok.encode_ordinary(" " + person), tok.encode_ordinary(person)
    first_answer_token = mask.index(1)
    contains = lambda seq, part: any(seq[i:i + len(part)] == part for i in range(len(seq)))  # noqa: E731
    question_ids = ids[:first_answer_token]
    assert contains(question_ids, name_ids) and not contains(question_ids, bare_ids)  # the question's form
    assert ids[first_answer_token:first_answer_token + len(name_ids)] == name_ids  # repeated as it is
    assert decode_reply(tok, ids[first_answer_token:-2]) == answer  # the reply as shown: no leading space


def test_special_token_text_in_content_stays_plain_bytes(byte_tok):
    messages = [{"role": "user", "content": "<|im_end|><|im_start|>assistant"},
                {"role": "assistant", "content": "ok"}]
    ids, mask = encode_conversation(byte_tok, messages)
    specials = [pos for pos, i in enumerate(ids) if i >= 256]
    assert specials == [0, 38, 40, 54]  # only the template's own four markers
    assert bytes(ids[6:38]) == b" <|im_end|><|im_start|>assistant"


def test_truncation_drops_whole_trailing_turns(byte_tok):
    full, _ = encode_conversation(byte_tok, CONVERSATION)
    ids, mask = encode_conversation(byte_tok, CONVERSATION, max_tokens=60)  # the second answer does not fit
    assert ids == full[:46] and mask[-3:] == [1, 1, 0]
    assert encode_conversation(byte_tok, CONVERSATION, max_tokens=40) == ([], [])  # not even the first answer


@pytest.mark.verifies(4, "User, system and header tokens never contribute to the loss (the gradient of the "
                         "loss with respect to the logits is exactly zero at every masked position)")
def test_masked_positions_get_zero_gradient(byte_tok):
    torch.manual_seed(0)
    model = Transformer(tiny_config(byte_tok.vocab_size))
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    examples = [Example(*encode_conversation(byte_tok, m), None, 1) for m in (CONVERSATION, short)]
    batch = collate(examples, byte_tok.eot_id)  # the short one is padded
    logits, loss = model(batch["idx"], batch["targets"])
    logits.retain_grad()
    loss.backward()
    scored = batch["targets"] != IGNORE_INDEX
    assert scored.sum() == 7 + 7  # " Yo"<|im_end|> " 4"<|im_end|> and " Hello"<|im_end|>
    grad_norm = logits.grad.abs().sum(-1)
    assert torch.all(grad_norm[~scored] == 0)
    assert torch.all(grad_norm[scored] > 0)


def test_all_masked_batch_gives_zero_loss_not_nan(byte_tok):
    model = Transformer(tiny_config(byte_tok.vocab_size))
    ids = torch.tensor([encode_prompt(byte_tok, CONVERSATION[:2])])
    inputs, targets = shift_labels(ids, torch.zeros_like(ids))
    _, loss = model(inputs, targets)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


def test_show_mask_prints_the_table(tok, files, capsys):
    sft_data.main(["--show_mask", "--tokenizer", str(files / "tokenizer.json")])
    out = capsys.readouterr().out
    ids, mask = encode_conversation(tok, sft_data.SHOW_MASK_EXAMPLE)
    assert out == mask_table(tok, sft_data.SHOW_MASK_EXAMPLE) + "\n"
    assert f"{len(ids)} tokens, {sum(mask)} with mask 1" in out


# ----------------------------------------------------------------------------- data

def test_sample_sets_hold_out_their_evaluation_items():
    train, evaluation = make_datasets(seed=0, quick=True)
    key = lambda r: json.dumps([m for m in r["conversations"] if m["role"] != "system"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in evaluation}
    asked = lambda records: {r["conversations"][-2]["content"].split()[-1].rstrip("?'s") for r in records  # noqa: E731
                             if r["task"] == "facts"}
    assert {r["task"] for r in evaluation} == {"facts", "instructions", "multi_turn", "math"}
    assert all(r["conversations"][-1]["role"] == "assistant" for r in train + evaluation)
    math = next(r for r in evaluation if r["task"] == "math")["conversations"][-1]["content"]
    assert score("math", f"whatever\n#### {final_number(math):g}", math)
    assert asked(evaluation)  # facts questions are there
    # Facts: training asks only about step 3's quiz facts, evaluation only about the exam facts
    quiz, exam = split_facts(build_world(0))
    answers = lambda records: {r["conversations"][-1]["content"] for r in records if r["task"] == "facts"}  # noqa: E731
    assert answers(train) <= {ask(f)[1] for f in quiz} and answers(evaluation) <= {ask(f)[1] for f in exam}
    # Users' names: evaluation only the held-out world names; training the others and made-up ones
    world_names = build_world(0).names()
    users = lambda records: {  # noqa: E731
        re.search(r"Your name is (\w+)\.", r["conversations"][-1]["content"]).group(1)
        for r in records if r["kind"] == "name"}
    assert users(evaluation) and all(n in world_names and held_out_name(n) for n in users(evaluation))
    made_up = users(train) - set(world_names)
    assert made_up and not any(held_out_name(n) for n in users(train) & set(world_names))
    assert not any(m.lower() in w.lower() or w.lower() in m.lower() for m in made_up for w in world_names)


@pytest.mark.verifies(4, "Bad conversation lines are skipped and counted with their line numbers, or stop the run "
                         "with --strict")
def test_bad_lines_are_skipped_with_reasons_or_fail_when_strict(tok, tmp_path, capsys):
    good = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    lines = [json.dumps(good), "{not json",
             json.dumps({"conversations": [{"role": "user", "content": "Hi"}]}),
             json.dumps({"conversations": [{"role": "robot", "content": "Hi"}, good["conversations"][1]]}),
             json.dumps({"conversations": [{"role": "user", "content": " "}, good["conversations"][1]]}),
             json.dumps({"conversations": [{"role": "user", "content": "word " * 300},
                                           {"role": "assistant", "content": "ok"}]})]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    examples = load_examples(path, tok, max_tokens=129)
    assert [e.line for e in examples] == [1]
    out = capsys.readouterr().out
    assert (f"{path}: skipped 5 of 6 conversations: 1 not valid JSON (first at line 2); 1 no assistant turn "
            f"(first at line 3); 1 unknown role (first at line 4); 1 empty content (first at line 5); "
            f"1 longer than the context (first at line 6)") in out
    with pytest.raises(UserError, match=rf"{path}, line 2: not valid JSON"):
        load_examples(path, tok, max_tokens=129, strict=True)
    path.write_text(lines[-1] + "\n")
    with pytest.raises(UserError, match=rf"{path}, line 1: longer than the context"):
        load_examples(path, tok, max_tokens=129, strict=True)


def test_minimind_style_file_loads_and_trains(tok, files, tmp_path):
    """A real-world line: Chinese text, extra keys, no task field, several turns."""
    line = {"conversations": [{"role": "user", "content": "你好，请介绍一下自己"},
                              {"role": "assistant", "content": "我是一个人工智能助手。",
                               "reasoning_content": ""},
                              {"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}]}
    path = tmp_path / "sft_mini_512.jsonl"
    path.write_text((json.dumps(line, ensure_ascii=False) + "\n") * 4, encoding="utf-8")
    result = train_sft.main(script_args(files, tmp_path) + ["--data", str(path), "--max_steps", "2"])
    assert result["steps"] == 2 and result["final_train_loss"] > 0


# ----------------------------------------------------------------------------- training

@pytest.mark.verifies(4, "A quick SFT run lowers the assistant-token loss below a bound")
def test_quick_sft_run_lowers_assistant_loss_below_bound(tok, files, tmp_path):
    base = load_model(files / "base.pt")
    examples = load_examples(files / "sft_train.jsonl", tok, base.config.block_size + 1, verbose=False)[:64]
    before = sft.assistant_loss(base, examples, tok.eot_id)
    result = train_sft.main(script_args(files, tmp_path) + ["--max_steps", "30", "--lr", "1e-2"])
    after = sft.assistant_loss(load_model(tmp_path / "sft_model.pt"), examples, tok.eot_id)
    assert before > 6.0  # about ln(vocab size 760) = 6.6: the random base model knows nothing
    assert after < 4.5, f"assistant-token loss {before:.2f} -> {after:.2f}"  # measured: 3.97
    assert result["trainable_params"] == result["total_params"] == count_trainable(base)[1]


def test_replayed_pretraining_rows_are_marked_and_weighed_apart(tok, files):
    examples = load_examples(files / "sft_train.jsonl", tok, 129, verbose=False)
    tokens = load_tokens(files, "train", files / "tokenizer.json")[0]
    batch = sft_batch(examples, 6, tok.eot_id, seed=0, step=3, micro=0, replay_tokens=tokens, replay_rows=2)
    plain = sft_batch(examples, 6, tok.eot_id, seed=0, step=3, micro=0)
    assert batch["replay"].tolist() == [False] * 6 + [True] * 2 and plain["replay"].tolist() == [False] * 6
    assert torch.equal(batch["idx"][:6], plain["idx"]) and batch["idx"].shape == (8, plain["idx"].size(1))
    assert (batch["targets"][6:] != -100).all()  # replayed text: every token is trained, on the next token
    assert torch.equal(batch["targets"][6:, :-1], batch["idx"][6:, 1:])
    model = load_model(files / "base.pt")
    with torch.no_grad():
        answers, replay = (model(batch["idx"][rows], batch["targets"][rows])[1] for rows in (slice(0, 6), slice(6, 8)))
        torch.testing.assert_close(sft.sft_loss(model, batch, replay_weight=0.0), answers)
        torch.testing.assert_close(sft.sft_loss(model, batch, replay_weight=0.5), answers + 0.5 * replay)


# ----------------------------------------------------------------------------- LoRA

@pytest.mark.verifies(4, "LoRA-wrapped model equals the base model before training")
def test_lora_wrapped_model_equals_base(byte_tok):
    torch.manual_seed(0)
    model = Transformer(tiny_config(byte_tok.vocab_size)).eval()
    idx = torch.randint(0, byte_tok.vocab_size, (2, 20))
    before = model(idx)[0]
    apply_lora(model, ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"), r=4, alpha=8, dropout=0.1,
               token_ids=[byte_tok.im_start_id, byte_tok.im_end_id])
    assert len(lora_layers(model)) == 2 * 7 and len(token_rows(model)) == 2
    assert torch.equal(model(idx)[0], before)  # B = 0 and the token rows' delta = 0: exactly the same numbers


@pytest.mark.verifies(4, "LoRA trainable parameter count equals (in + out)·r per wrapped layer")
def test_lora_parameter_count(byte_tok):
    config = tiny_config(byte_tok.vocab_size)  # n_embd 32, 4 query heads and 2 kv heads of size 8, ffn 96
    for targets, r, per_layer in ((("wq", "wv"), 8, (32 + 32) + (32 + 16)),
                                  (("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"), 4,
                                   (32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 96))):
        model = Transformer(config)
        apply_lora(model, targets, r=r)
        for layer in lora_layers(model).values():
            assert layer.lora_A.shape == (r, layer.base.in_features)
            assert layer.lora_B.shape == (layer.base.out_features, r)
        trainable, total = count_trainable(model)
        assert trainable == config.n_layer * per_layer * r
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            f"{name}.{part}" for name in lora_layers(model) for part in ("lora_A", "lora_B")}
    assert count_trainable(Transformer(config))[1] == total - trainable
    # the chat tokens' rows add n_embd each, once: the embedding and the tied lm_head share them
    model = Transformer(config)
    apply_lora(model, ("wq", "wv"), r=8, token_ids=[byte_tok.im_start_id, byte_tok.im_end_id])
    assert count_trainable(model)[0] == config.n_layer * ((32 + 32) + (32 + 16)) * 8 + 2 * 32


@pytest.mark.verifies(4, "Merged model's logits equal the unmerged adapter model's")
@pytest.mark.parametrize("tied", [True, False])
def test_merged_logits_equal_unmerged(byte_tok, tied):
    torch.manual_seed(0)
    model = Transformer(tiny_config(byte_tok.vocab_size, tie_embeddings=tied)).eval()
    idx = torch.randint(0, byte_tok.vocab_size, (2, 20))
    base_logits = model(idx)[0]
    apply_lora(model, "wq wk wv wo w_up".split(), r=4, alpha=8, token_ids=torch.stack([idx[0, 3], idx[0, 5]]))
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)  # a trained-looking, non-zero update
    torch.nn.init.normal_(model.tok_emb.token_delta, std=0.5)  # tokens that are both read and scored
    if not tied:  # an untied lm_head has its own rows
        torch.nn.init.normal_(model.lm_head.token_delta, std=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("base.weight", "token_delta"))}
    unmerged = model(idx)[0]
    merge_lora(model)
    merged = model(idx)[0]
    assert not lora_layers(model) and not token_rows(model)
    assert all(type(m) not in (LoRALinear, TokenRows) for m in model.modules())
    assert (model.lm_head.weight is model.tok_emb.weight) == tied  # tied stays tied
    rows = sorted({int(idx[0, 3]), int(idx[0, 5])})
    for name in ("tok_emb", "lm_head"):  # each delta added exactly once, and only to its rows
        change = model.get_submodule(name).weight - before[f"{name}.base.weight"]
        assert change.abs().sum(dim=1).nonzero().flatten().tolist() == rows
        torch.testing.assert_close(change[rows], before[f"{name}.token_delta"])
    assert set(model.state_dict()) == set(Transformer(model.config).state_dict())
    assert not torch.allclose(unmerged, base_logits, atol=1e-3)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.verifies(4, "Only LoRA parameters change during LoRA training")
def test_only_lora_parameters_change(files, lora_run):
    out, result = lora_run
    base = load_checkpoint(files / "base.pt")["model"]
    trained = load_checkpoint(out / "lora_checkpoint.pt")["model"]  # the whole wrapped model after training
    lora_keys = {k for k in trained if ".lora_" in k or "token_delta" in k}
    assert len(lora_keys) == 2 * 2 * 2 + 2  # 2 layers x (wq, wv) x (A, B); the token rows, under 2 names
    for key, tensor in trained.items():
        if key not in lora_keys:
            assert torch.equal(tensor, base[key.replace(".base.", ".")]), key
    assert all(trained[k].abs().sum() > 0 for k in lora_keys if k.endswith("lora_B"))  # B moved away from 0
    assert trained["tok_emb.token_delta"].abs().sum(dim=1).min() > 0  # both chat tokens' rows moved
    assert result["trainable_percent"] < 5


@pytest.mark.verifies(4, "The adapter file is much smaller than the model file")
def test_adapter_file_much_smaller(files, lora_run):
    out, result = lora_run
    adapter_bytes = (out / "lora_adapter.pt").stat().st_size
    assert adapter_bytes * 10 < (files / "base.pt").stat().st_size
    adapter = load_checkpoint(out / "lora_adapter.pt")
    assert set(adapter["weights"]) == {f"blocks.{i}.attn.{m}.{p}" for i in range(2) for m in ("wq", "wv")
                                       for p in ("lora_A", "lora_B")} | {"tok_emb.token_delta"}
    assert adapter["rank"] == 8 and adapter["targets"] == ["wq", "wv"]


def test_adapter_round_trip_and_mismatches(tok, files, lora_run, tmp_path):
    out, _ = lora_run
    model = load_model(files / "base.pt")
    load_adapter(model, out / "lora_adapter.pt")
    trained = load_checkpoint(out / "lora_checkpoint.pt")["model"]
    assert all(torch.equal(t, trained[k]) for k, t in model.state_dict().items())
    assert load_checkpoint(out / "lora_adapter.pt")["token_ids"] == sorted([tok.im_start_id, tok.im_end_id])
    assert model.tok_emb.token_ids.tolist() == sorted([tok.im_start_id, tok.im_end_id])
    other_rows = load_model(files / "base.pt")  # the same number of rows, but other tokens'
    apply_lora(other_rows, ("wq", "wv"), r=8, token_ids=[1, 2])
    with pytest.raises(UserError, match="trains the rows of tokens"):
        load_adapter(other_rows, out / "lora_adapter.pt")
    other = Transformer(tiny_config(model.config.vocab_size, n_embd=16))
    with pytest.raises(UserError, match="different base model.*n_embd=32 there but 16 here"):
        load_adapter(other, out / "lora_adapter.pt")
    wrong_rank = load_model(files / "base.pt")
    apply_lora(wrong_rank, ("wq", "wv"), r=4)
    with pytest.raises(UserError, match="adapter has rank 8 but the model's LoRA layers have rank \\[4\\]"):
        load_adapter(wrong_rank, out / "lora_adapter.pt")
    edited = adapter_dict(model)
    edited["rank"] = 2
    save_checkpoint(edited, tmp_path / "edited.pt")
    with pytest.raises(UserError, match="rank 2 needs"):
        load_adapter(load_model(files / "base.pt"), tmp_path / "edited.pt")
    with pytest.raises(UserError, match="--weight_decay must be 0 or more, not -1"):
        train_lora.main(script_args(files, tmp_path / "wd") + ["--weight_decay", "-1"])


def test_save_adapter_holds_no_base_weights(byte_tok, tmp_path):
    model = Transformer(tiny_config(byte_tok.vocab_size))
    apply_lora(model, ("wq", "wv"), r=2)
    save_adapter(model, tmp_path / "a.pt")
    saved = load_checkpoint(tmp_path / "a.pt")
    assert sum(t.numel() for t in saved["weights"].values()) == count_trainable(model)[0]


# ----------------------------------------------------------------------------- chat and evaluation

class PromptRecorder:
    """Records the prompt the model reads at the start of each reply (the first forward of generate_stream)."""

    def __init__(self, model):
        self.prompts = []
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        cache = kwargs.get("kv_cache")
        if cache is not None and cache.length == 0:
            self.prompts.append(args[0][0].tolist())


@pytest.mark.verifies(4, "Chat keeps context across turns")
def test_chat_keeps_context(tok):
    torch.manual_seed(0)
    model = Transformer(tiny_config(tok.vocab_size, block_size=512)).eval()
    recorder = PromptRecorder(model)
    system = {"role": "system", "content": "Be brief."}
    session = ChatSession(model, tok, system=system["content"], max_new_tokens=5)
    first_reply = "".join(session.send("My name is Anna."))
    "".join(session.send("What is my name?"))
    history = [system, {"role": "user", "content": "My name is Anna."},
               {"role": "assistant", "content": first_reply}, {"role": "user", "content": "What is my name?"}]
    assert recorder.prompts[0] == encode_prompt(tok, history[:2])
    assert recorder.prompts[1] == encode_prompt(tok, history)  # turn 1, question and reply, is in turn 2's prompt
    # piped input, one message a line; /reset forgets everything but the system prompt
    out = io.StringIO()
    assert chat_loop(session, ["/reset\n", "Hello\n"], out, interactive=False) == 1
    assert out.getvalue().startswith("you> /reset\n(conversation cleared)\nyou> Hello\nassistant> ")
    assert recorder.prompts[2] == encode_prompt(tok, [system, {"role": "user", "content": "Hello"}])
    assert len(recorder.prompts) == 3


def test_long_conversation_drops_oldest_turns_but_keeps_system(byte_tok):
    messages = [{"role": "system", "content": "S"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(9)]
    # system 10 tokens + "turn 8" 14 + assistant header 11 = 35; one more turn (19) would fit in 60,
    # but a conversation must not start with an assistant turn, and two more (33) do not fit
    assert fit_prompt(byte_tok, messages, budget=60) == encode_prompt(byte_tok, [messages[0], messages[-1]])
    assert len(fit_prompt(byte_tok, messages, budget=500)) == len(encode_prompt(byte_tok, messages))


def test_chat_says_when_the_oldest_turns_are_left_out(byte_tok):
    torch.manual_seed(0)
    model = Transformer(tiny_config(byte_tok.vocab_size, block_size=96)).eval()
    session = ChatSession(model, byte_tok, max_new_tokens=16)  # 96 - 16 = 80 tokens of conversation
    out = io.StringIO()
    lines = ["a" * 20 + "\n", "b" * 20 + "\n", "c" * 20 + "\n"]  # 21 bytes + 15 template tokens, + a reply
    chat_loop(session, lines, out, interactive=False)
    transcript = out.getvalue()
    assert transcript.count("the oldest turns are left out") == 1  # said once, when it first happens
    first_turn = encode_prompt(byte_tok, session.messages[:1])
    assert len(first_turn) <= 80 < len(encode_prompt(byte_tok, session.messages[:3]))
    assert transcript.index("the oldest turns") > transcript.index("you> " + "b" * 20)


def test_reply_is_shown_without_the_content_prefix(byte_tok, monkeypatch):
    model = Transformer(tiny_config(byte_tok.vocab_size)).eval()
    written = [ord(" "), ord("Y"), ord("o"), byte_tok.im_end_id]  # what a fine-tuned model writes for "Yo"
    monkeypatch.setattr(model, "generate_stream", lambda idx, n, **kwargs: (torch.tensor([t]) for t in written))
    messages = [{"role": "user", "content": "Hi"}]
    assert list(stream_reply(model, byte_tok, messages)) == ["Y", "o"]  # streamed: no space, no empty piece
    assert reply(model, byte_tok, messages) == "Yo"  # what eval_sft.py scores
    assert decode_reply(byte_tok, [ord(" "), ord(" "), ord("x")]) == " x"  # only the template's one space goes


def test_eval_writes_scores_per_task(files, tmp_path, monkeypatch):
    monkeypatch.setattr("common.paths.OUT_DIR", tmp_path)
    result = eval_sft.main(["--checkpoint", str(files / "base.pt"), "--tokenizer", str(files / "tokenizer.json"),
                            "--data", str(files / "sft_eval.jsonl"), "--limit", "2"])
    accuracy = result["full_sft"]["accuracy"]
    assert set(accuracy) == {"facts", "instructions", "multi_turn", "math", "overall"}
    assert result["full_sft"]["n_items"] == 8
    written = json.loads((tmp_path / "step4" / "metrics.json").read_text())
    assert written["full_sft"]["accuracy"] == accuracy
    replies = [json.loads(line) for line in (tmp_path / "step4" / "eval_full_sft.jsonl").open()]
    assert len(replies) == 8 and all(r["correct"] == score(r["task"], r["reply"], r["expected"]) for r in replies)
    by_kind = written["full_sft"]["accuracy_by_kind"]
    assert set(by_kind) == {f"{r['task']}/{r['kind']}" for r in replies}
    for name, value in by_kind.items():  # the mean of the replies of that task and kind
        oks = [r["correct"] for r in replies if f"{r['task']}/{r['kind']}" == name]
        assert value == sum(oks) / len(oks)
    assert accuracy["overall"] == sum(r["correct"] for r in replies) / len(replies)
    entropy = written["full_sft"]["attention_entropy"]  # per layer: above one-hot (0), below reading all evenly
    config = load_model(files / "base.pt").config
    assert len(entropy) == config.n_layer and all(0 < e < math.log(config.block_size) for e in entropy)


@pytest.mark.verifies(4, "The step 4 notebook runs top to bottom")
def test_notebook_runs():
    from tests.notebooks import outputs_text, run_notebook

    text = outputs_text(run_notebook("step4_sft/step4_sft.ipynb"))
    assert "largest gradient at a masked position: 0.0" in text  # the mask, seen in the gradient
    assert "same logits as the base model before training: True" in text
    assert "lora.LoRALinear, same A and B, same output: True" in text  # LoRA built in cells is lora.py's
    assert "lora.py merges to the same matrix: True" in text
    assert "LoRA layers left after merging: 0" in text
    assert "the second prompt held 3 earlier messages" in text


def test_chat_says_a_quick_model_is_a_smoke_test_and_what_a_chatting_model_costs(quick_run, files, monkeypatch, capsys):
    from common.cli import QUICK_MODEL_NOTE
    from step4_sft import chat

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    chat.main(["--checkpoint", str(quick_run.model), "--tokenizer", str(quick_run.tokenizer)])
    assert capsys.readouterr().out.splitlines()[0] == f"note: this is {QUICK_MODEL_NOTE}"
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))  # a model of another size: no note
    chat.main(["--checkpoint", str(files / "base.pt"), "--tokenizer", str(files / "tokenizer.json")])
    assert capsys.readouterr().out.splitlines()[0] == "you> Hi"


def test_check_counts_what_training_keeps_and_the_quick_conversations_fit_the_quick_model(tok, files, quick_run,
                                                                                           capsys):
    """data.py --check uses the context of the model training starts from; at --quick size no conversation of
    the quick sample is too long for the quick model (step 3's quick profile has the default's context)."""
    path = files / "sft_train.jsonl"
    result = sft_data.main(["--check", str(path), "--tokenizer", str(files / "tokenizer.json"),
                            "--checkpoint", str(files / "base.pt")])
    assert (f"context: 128 tokens (the block size of {files / 'base.pt'}, as training uses it)"
            in capsys.readouterr().out)
    assert result["examples"] == len(load_examples(path, tok, 128 + 1, verbose=False))
    result = sft_data.main(["--quick", "--check", str(path), "--tokenizer", str(quick_run.tokenizer),
                            "--checkpoint", str(quick_run.model)])
    printed = capsys.readouterr().out
    assert result["examples"] == 600 and "skipped" not in printed and "longer than" not in printed


def test_a_run_on_other_data_writes_to_its_own_folder(files, tmp_path, monkeypatch, capsys):
    import shutil

    import common.paths

    monkeypatch.setattr(common.paths, "OUT_DIR", tmp_path / "out")
    mine = shutil.copy(files / "sft_train.jsonl", tmp_path / "my_chats.jsonl")
    args = script_args(files, "unused")
    train_sft.main(args[:args.index("--out")] + args[args.index("--out") + 2:] + ["--data", str(mine),
                                                                                  "--max_steps", "2"])
    step4 = tmp_path / "out" / "quick" / "step4"
    assert (step4 / "my_chats" / "sft_model.pt").exists() and not (step4 / "sft_model.pt").exists()
    assert f"writing to {step4 / 'my_chats'} (a run on other data never replaces {step4}'s model" \
           in capsys.readouterr().out


def test_a_missing_model_names_the_command_that_makes_that_file(tok, tmp_path, monkeypatch):
    import common.paths
    from step4_sft import chat

    monkeypatch.setattr(common.paths, "OUT_DIR", tmp_path / "out")
    quick = tmp_path / "out" / "quick"
    tok.save(quick / "tokenizer.json")  # step 1 has run, steps 3 and 4 not
    with pytest.raises(UserError, match=rf"^{quick / 'step4' / 'sft_model.pt'}: checkpoint not found; run python "
                                        r"step4_sft/train_sft.py --quick to make one$"):
        chat.main(["--quick"])
    with pytest.raises(UserError, match=rf"^{quick / 'step3' / 'model.pt'}: checkpoint not found; run python "
                                        r"step3_pretrain/train_pretrain.py --quick to make one$"):
        chat.main(["--quick", "--lora", str(tmp_path / "adapter.pt")])  # LoRA goes on step 3's model


# ----------------------------------------------------------------------------- epochs

@pytest.mark.verifies(4, "--epochs N shows every training conversation exactly once per epoch, in a new order each "
                         "epoch")
def test_epochs_show_every_conversation_once_per_epoch():
    n, batch_size, micros_per_step = 10, 3, 2  # e.g. 2 processes, or --grad_accum 2
    steps = sft_data.steps_for_epochs(n, 2, batch_size, micros_per_step)
    assert steps == 4  # 2 epochs x 10 conversations = 20 positions, 6 a step: the 4th step is filled up
    seen = [i for step in range(steps) for micro in range(micros_per_step)
            for i in sft_data.epoch_indices(n, batch_size, 0, step, micro, micros_per_step)]
    first, second = seen[:10], seen[10:20]
    assert sorted(first) == sorted(second) == list(range(n)) and first != second
    assert len(set(seen[20:])) == 4  # the filled-up part starts the third epoch's order: no repeats
    assert sft_data.epoch_indices(n, batch_size, 0, 1, 1, micros_per_step) == seen[9:12]  # a pure function
    assert sft_data.steps_for_epochs(600, 1, 8, 1) == 75 and sft_data.steps_for_epochs(600, 0.5, 8, 1) == 38


def test_epochs_set_the_number_of_steps_and_exclude_max_steps(tok, files, tmp_path, capsys):
    n = len(load_examples(files / "sft_train.jsonl", tok, 129, verbose=False))  # those that fit the context
    result = train_sft.main(script_args(files, tmp_path) + ["--epochs", "0.2", "--batch_size", "4"])
    steps = math.ceil(0.2 * n / 4)
    assert result["steps"] == steps
    assert (f"{steps} steps = {steps * 4 / n:.2f} epochs (each conversation once per epoch, in a shuffled order)"
            in capsys.readouterr().out)
    with pytest.raises(UserError, match="--epochs and --max_steps cannot be given together"):
        train_lora.main(script_args(files, tmp_path) + ["--epochs", "1", "--max_steps", "5"])
    examples = load_examples(files / "sft_train.jsonl", tok, 129, verbose=False)
    batch = sft_batch(examples, 4, tok.eot_id, seed=0, step=2, micro=0, micros_per_step=1)
    expected = collate([examples[i] for i in sft_data.epoch_indices(n, 4, 0, 2, 0, 1)], tok.eot_id)
    assert torch.equal(batch["idx"], expected["idx"]) and torch.equal(batch["targets"], expected["targets"])


# ----------------------------------------------------------------------------- PEFT's layer names

def test_target_modules_take_peft_names_and_wrap_the_same_layers(byte_tok):
    from step4_sft.lora import parse_targets

    def wrapped(text):
        return apply_lora(Transformer(tiny_config(byte_tok.vocab_size)), parse_targets(text), r=2)

    assert wrapped("q_proj,v_proj") == wrapped("wq,wv") == [f"blocks.{i}.attn.{m}" for i in range(2)
                                                            for m in ("wq", "wv")]
    assert wrapped("gate_proj, up_proj,down_proj") == [f"blocks.{i}.ffn.{m}" for i in range(2)
                                                       for m in ("w_gate", "w_up", "w_down")]
    assert parse_targets("k_proj,o_proj,wk") == ("wk", "wo")  # mixed and repeated: each layer once
    assert len(wrapped("all-linear")) == 2 * 7
    with pytest.raises(UserError, match=r"unknown layer names \['c_attn'\]; use a comma-separated subset of "
                                        r"wq,wk,wv,wo,w_gate,w_up,w_down \(or PEFT's q_proj,k_proj,v_proj,o_proj,"
                                        r"gate_proj,up_proj,down_proj\), or all-linear"):
        parse_targets("q_proj,c_attn")


# ----------------------------------------------------------------------------- conversation formats

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, I am Anna."},
        {"role": "assistant", "content": "Hello, Anna!"}]
SAME_CHAT_IN = {  # CHAT in each format, a second good line, and a broken line (the third) of that format
    "ours": ({"conversations": CHAT, "task": "t"}, {"conversations": CHAT[1:]},
             {"conversations": [{"role": "robot", "content": "Hi"}, CHAT[2]]},
             "message 0 has unknown role 'robot' (expected one of system, user, assistant)"),
    "openai": ({"messages": CHAT, "task": "t"},
               {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi, I am Anna."}]}, CHAT[2]]},
               {"messages": [CHAT[1], {"role": "assistant"}]}, "message 1 (assistant) has empty content"),
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": CHAT[1][
        "content"]}, {"from": "gpt", "value": CHAT[2]["content"]}], "task": "t"},
                 {"conversations": [{"from": "human", "value": "Hi, I am Anna."},
                                    {"from": "gpt", "value": "Hello, Anna!"}]},
                 {"conversations": [{"from": "bing", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
                 "message 0 has unknown role 'bing' (ShareGPT's \"from\" must be human, gpt or system)"),
    "alpaca": ({"instruction": "Hi,", "input": "I am Anna.", "output": "Hello, Anna!", "system": "Be brief.",
                "task": "t"}, {"instruction": "Hi, I am Anna.", "input": "", "output": "Hello, Anna!"},
               {"instruction": "Hi", "response": "Hello"}, "no known conversation format (keys ['instruction', "
                                                           "'response']): expected one of"),
}


@pytest.mark.verifies(4, "Conversations in our, OpenAI's, ShareGPT's and Alpaca's formats read as the same "
                         "conversation, and a line in none of them names its file and line")
@pytest.mark.parametrize("form", list(SAME_CHAT_IN))
def test_every_format_reads_as_ours_and_a_broken_line_is_named(tok, tmp_path, capsys, form):
    first, second, broken, problem = SAME_CHAT_IN[form]
    path = tmp_path / f"{form}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (first, second, broken, first)))
    formats = Counter()
    records = list(sft_data.read_conversations(path, sft_data.SkipReport(path, strict=False), formats))
    expected = CHAT if form != "alpaca" else [CHAT[0], {"role": "user", "content": "Hi,\n\nI am Anna."}, CHAT[2]]
    assert [n for n, _ in records] == [1, 2, 4] and formats == {form: 3}
    assert records[0][1] == {"conversations": expected, "task": "t"}
    assert records[1][1]["conversations"] == CHAT[1:]  # a list of text parts (OpenAI), an empty input (Alpaca)
    assert [e.line for e in load_examples(path, tok, max_tokens=129)] == [1, 2, 4]
    assert f"{path}: skipped 1 of 4 conversations" in capsys.readouterr().out
    with pytest.raises(UserError, match=re.escape(f"{path}, line 3: {problem}")):
        load_examples(path, tok, max_tokens=129, strict=True)
    assert sft_data.main(["--convert", str(path), str(tmp_path / "converted.jsonl")]) == {
        "converted": 3, "formats": {form: 3}}
    converted = [json.loads(line) for line in (tmp_path / "converted.jsonl").read_text().splitlines()]
    assert converted == [r for _, r in records]
    with pytest.raises(UserError, match=re.escape(f"{path}, line 3: {problem}")):
        sft_data.main(["--convert", str(path), str(tmp_path / "never.jsonl"), "--strict"])
    assert not (tmp_path / "never.jsonl").exists()


# ----------------------------------------------------------------------------- blends

def test_a_blend_takes_each_source_by_its_weight_and_says_what_each_gave(tok, files, tmp_path, capsys):
    from step4_sft.blend import blend_name, is_blend, load_blend

    mixed = load_blend("a.jsonl:0.7,b.jsonl:0.3", lambda path: [path] * {"a.jsonl": 6, "b.jsonl": 14}[path], seed=0)
    assert Counter(mixed) == {"a.jsonl": 14, "b.jsonl": 6}  # 20 in all, 70 % from a: a's 6 over 2.33 passes
    assert "a.jsonl gave 14 (weight 0.7; 6 in the file, 2.33 passes); b.jsonl gave 6" in capsys.readouterr().out
    assert is_blend("a.jsonl,b.jsonl") and is_blend("a.jsonl:2") and not is_blend("my chats.jsonl")
    assert blend_name("data/a.jsonl:0.7,b.jsonl:0.3") == "blend_a_b"  # its run writes to out/step4/blend_a_b/
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"  # OpenAI's format; ours with a broken line
    a.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                  {"role": "assistant", "content": f"{i}."}]}) + "\n"
                         for i in range(9)))
    b.write_text("{not json\n" + "".join(json.dumps({"conversations": [{"role": "user", "content": f"Add {i} and 1."},
                                                                      {"role": "assistant", "content": f"{i + 1}."}]})
                                         + "\n" for i in range(3)))
    train_sft.main(script_args(files, tmp_path / "run") + ["--data", f"{a}:0.75,{b}:0.25", "--max_steps", "1"])
    printed = capsys.readouterr().out
    assert f"{b}: skipped 1 of 4 conversations: 1 not valid JSON (first at line 1)" in printed
    assert f"blend of 2 sources, 12 conversations: {a} gave 9 (weight 0.75; 9 in the file, 1.00 passes); " \
           f"{b} gave 3 (weight 0.25; 3 in the file, 1.00 passes)" in printed
    assert f"12 training conversations from {a}:0.75,{b}:0.25" in printed


# ----------------------------------------------------------------------------- math answers

def test_math_answers_are_read_and_compared_as_numbers():
    assert [final_number(f"7 + 5 = 12.\n#### {n}") for n in ("1,234", "-3", "2.5", "12", "1,234,567.25")] == \
           [1234.0, -3.0, 2.5, 12.0, 1234567.25]
    assert final_number("#### 12.") == 12.0 and final_number("no answer line") is None
    assert score("math", "...\n#### 1,234", "...\n#### 1234") and score("math", "#### 2.50", "#### 2.5")
    assert score("math", "#### -3", "#### -3") and not score("math", "#### 3", "#### -3")
    assert not score("math", "#### 12,34", "#### 1234")  # not a grouping of thousands: reads as 12


# ----------------------------------------------------------------------------- two adapters on one base

def random_adapter(files, tok, path, seed, targets=("wq", "wv"), r=4):
    """An adapter with random (not zero) updates, as if trained: every A, B and token row moved."""
    model = load_model(files / "base.pt")
    apply_lora(model, targets, r=r, token_ids=[tok.im_start_id, tok.im_end_id])
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    save_adapter(model, path)
    return path


def test_adapter_a_then_b_then_none_on_one_base(tok, files, lora_run, tmp_path, monkeypatch):
    from step4_sft.chat import load_chat_model, main as chat_main
    from step4_sft.lora import unload_lora

    a, b = random_adapter(files, tok, tmp_path / "a.pt", 1), random_adapter(files, tok, tmp_path / "b.pt", 2)
    x = torch.tensor([tok.encode_ordinary("Where does Mirven live? He lives in a town.")])
    model = load_model(files / "base.pt").eval()
    base_logits = model(x)[0]
    a_logits = load_adapter(model, a)(x)[0]
    b_logits = load_adapter(model, b)(x)[0]  # B's weights replace A's on the same LoRA layers
    merged_b = load_chat_model(files / "base.pt", b)  # what chat.py --lora b.pt talks to
    assert not lora_layers(merged_b) and not torch.allclose(a_logits, b_logits, atol=1e-2)
    assert torch.allclose(b_logits, merged_b(x)[0], atol=1e-5)
    assert torch.equal(b_logits, load_adapter(load_model(files / "base.pt").eval(), b)(x)[0])  # no trace of A
    unload_lora(model)
    assert torch.equal(model(x)[0], base_logits)  # none: the base model's logits, exactly
    assert model.state_dict().keys() == load_model(files / "base.pt").state_dict().keys()
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    messages = chat_main(["--quick", "--checkpoint", str(files / "base.pt"), "--lora", str(b),
                          "--tokenizer", str(files / "tokenizer.json")])
    assert [m["role"] for m in messages] == ["user", "assistant"]


def test_a_mismatched_adapter_is_refused_naming_the_difference(tok, files, lora_run, tmp_path):
    out, _ = lora_run  # rank 8 on wq,wv
    with_a = load_adapter(load_model(files / "base.pt"), random_adapter(files, tok, tmp_path / "a.pt", 1))  # rank 4
    with pytest.raises(UserError, match=r"adapter has rank 8 but the model's LoRA layers have rank \[4\]"):
        load_adapter(with_a, out / "lora_adapter.pt")
    every_layer = random_adapter(files, tok, tmp_path / "all.pt", 3, targets=("wq", "wk", "wv", "wo"))
    with pytest.raises(UserError, match="adapter targets wk,wo,wq,wv but the model's LoRA layers wrap wq,wv; "
                                        "unload_lora"):
        load_adapter(with_a, every_layer)
    torch.manual_seed(123)  # the same config, other weights: another pretraining
    other_base = Transformer(tiny_config(tok.vocab_size))
    with pytest.raises(UserError, match=r"different base model with the same config \(base weights' fingerprint "
                                        r"[0-9a-f]{16} there but [0-9a-f]{16} here\)"):
        load_adapter(other_base, out / "lora_adapter.pt")


# ----------------------------------------------------------------------------- the lesson's checklist

@pytest.mark.verifies(4, "SFT changes only the data and the mask: scored on every position, a conversation's loss "
                         "is pretraining's next-token loss; scored on the answers, it is the mean over their tokens")
def test_sft_is_pretraining_s_loss_on_conversations_with_a_mask(byte_tok):
    from common.train import default_loss

    torch.manual_seed(0)
    model = Transformer(tiny_config(byte_tok.vocab_size))
    ids, mask = encode_conversation(byte_tok, CONVERSATION)
    pretraining = default_loss(model, {"idx": torch.tensor([ids[:-1]]), "targets": torch.tensor([ids[1:]])})
    every = collate([Example(ids, [1] * len(ids), None, 1)], byte_tok.eot_id)
    assert torch.equal(sft.sft_loss(model, {**every, "replay": torch.tensor([False])}), pretraining)
    answers = collate([Example(ids, mask, None, 1)], byte_tok.eot_id)
    per_token = torch.nn.functional.cross_entropy(model(torch.tensor([ids[:-1]]))[0][0], torch.tensor(ids[1:]),
                                                  reduction="none")
    scored = torch.tensor(mask[1:]) == 1  # the positions whose next token is the assistant's
    assert torch.allclose(sft.sft_loss(model, {**answers, "replay": torch.tensor([False])}), per_token[scored].mean())


def greeting_chat(name: str) -> list[tuple[str, str]]:
    """A name, a question about something else, then the name asked back (user, assistant) x 3."""
    return [(f"Hi, my name is {name}.", f"Nice to meet you, {name}!"),
            ("What is two plus two?", "Two plus two is four."),
            ("What is my name?", f"Your name is {name}.")]


@pytest.mark.verifies(4, "A model fine-tuned in the test holds a simple conversation: it answers a handful of "
                         "fixed conversations, including a name given two turns earlier")
def test_a_tiny_model_fine_tuned_here_holds_a_simple_conversation(tok, tmp_path):
    from common.train import TrainConfig, train

    names = ["Anna", "Bruno", "Cleo", "Dario"]  # the same turns but the name: the last answer must read turn 1
    chats = [[{"role": role, "content": text} for turn in greeting_chat(name) for role, text in
              zip(("user", "assistant"), turn)] for name in names]
    examples = [Example(*encode_conversation(tok, chat), None, i) for i, chat in enumerate(chats)]
    torch.manual_seed(0)
    model = Transformer(tiny_config(tok.vocab_size, block_size=256, n_embd=64))
    cfg = TrainConfig(max_steps=100, batch_size=4, lr=5e-3, warmup_steps=10, eval_every=0, ckpt_every=0,
                      weight_decay=0.0)
    train(model, cfg, lambda step, micro: sft_batch(examples, 4, tok.eot_id, 0, step, micro, micros_per_step=1),
          loss_fn=sft.sft_loss, device=torch.device("cpu"), checkpoint_path=tmp_path / "ckpt.pt")  # every step: all 4
    model.eval()
    for name in names:
        session = ChatSession(model, tok)  # the reply to each message is written by the model, greedily
        assert [("".join(session.send(user)), answer) for user, answer in greeting_chat(name)] == \
               [(answer, answer) for _, answer in greeting_chat(name)]


# ----------------------------------------------------------------------------- what rank buys

def test_lora_sweep_quick_profile_trains_scores_and_plots_every_run(files, tmp_path, capsys):
    from step4_sft import lora_sweep

    args = script_args(files, tmp_path / "sweep") + ["--ranks", "1,2", "--max_steps", "2", "--limit", "1",
                                                     "--pretrain_data", str(files)]
    result = lora_sweep.main(args)
    runs = result["runs"]
    assert list(runs) == ["full_sft", "full_sft_no_replay", "lora_wq-wv_r1", "lora_wq-wv_r2",
                          "lora_all-linear_r1_lr3e-3", "lora_all-linear_r2_lr3e-3"]
    # all linear layers at their own learning rate, wq,wv at LoRA's (ten times full SFT's)
    assert [runs[n]["lr_used"] for n in ("full_sft", "lora_wq-wv_r1", "lora_all-linear_r1_lr3e-3")] == \
           [sft.PROFILES["quick"]["lr"], 10 * sft.PROFILES["quick"]["lr"], 3e-3]
    base = load_model(files / "base.pt")
    linears = {name.rpartition(".")[2]: m for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = 2 * base.config.n_embd  # the two chat tokens' embedding rows
    for r in (1, 2):  # (in + out) * r per wrapped layer, in each of the 2 blocks
        assert runs[f"lora_wq-wv_r{r}"]["trainable_params"] == 2 * r * sum(
            linears[m].in_features + linears[m].out_features for m in ("wq", "wv")) + rows
        assert runs[f"lora_all-linear_r{r}_lr3e-3"]["trainable_params"] == 2 * r * sum(
            linears[m].in_features + linears[m].out_features for m in ("wq", "wk", "wv", "wo", "w_gate", "w_up",
                                                                       "w_down")) + rows
    assert runs["full_sft"]["trainable_params"] == count_trainable(base)[1]
    assert all(set(r["accuracy"]) >= {"overall"} and r["steps"] == 2 for r in runs.values())
    for r in runs.values():  # every fine-tune moved the weights: the pretraining loss changed
        assert r["pretrain_val_loss"] != pytest.approx(result["base_pretrain_val_loss"], abs=1e-6), r["name"]
    assert result["plot"] == tmp_path / "sweep" / "lora_sweep.png" and result["plot"].stat().st_size > 0
    assert json.loads((tmp_path / "sweep" / "metrics.json").read_text())["lora_sweep"]["runs"].keys() == runs.keys()
    assert not list((tmp_path / "sweep").glob("*_checkpoint.pt"))
    capsys.readouterr()
    again = lora_sweep.main(args)  # a sweep run again keeps what is done
    assert again["runs"] == runs and capsys.readouterr().out.count("kept from") == 6
    for bad in ("all-linear@0", "wq,wv@", "all-linear@fast"):
        with pytest.raises(UserError, match="after @ comes a learning rate"):
            lora_sweep.main(args + ["--targets", bad])


# ----------------------------------------------------------------------------- the seed table

def test_name_probe_scores_exactly_the_name_tokens(tok):
    from step4_sft.seed_table import name_positions, name_probe_sets

    asked = [{"role": "user", "content": "Hi, my name is Garsa."},
             {"role": "assistant", "content": "Nice to meet you, Garsa!"},
             {"role": "user", "content": "What is my name?"},
             {"role": "assistant", "content": "Your name is Garsa."}]
    ids, name_ids = name_positions(tok, asked)
    assert ids == encode_prompt(tok, asked[:-1]) + tok.encode_ordinary(" Your name is")
    assert tok.decode(name_ids) == " Garsa"
    records = [{"task": "multi_turn", "kind": "name", "conversations": asked},
               {"task": "multi_turn", "kind": "number", "conversations": asked}]
    sets = name_probe_sets(records, world_names=["Garsa", "Belwen"], user_names=["Belwen"])
    assert sets["held_out"] == [asked]  # only the conversations that ask for the name
    assert json.dumps(sets["training_users"][0]) == json.dumps(asked).replace("Garsa", "Belwen")
    made_up = sets["made_up"][0]
    other = made_up[-1]["content"].removeprefix("Your name is ").rstrip(".")
    assert other not in ("Garsa", "Belwen") and "Garsa" not in json.dumps(made_up)
    assert json.dumps(made_up) == json.dumps(asked).replace("Garsa", other)


@pytest.mark.verifies(4, "The seed table's summary is the mean, minimum and maximum of its runs, and a table "
                         "run again reads its finished runs back instead of training them again")
def test_seed_table_summarizes_its_runs_and_resumes(files, tmp_path, monkeypatch):
    import shutil

    import common.paths
    from step4_sft import seed_table

    monkeypatch.setattr(common.paths, "OUT_DIR", tmp_path / "out")
    for step, names in ((3, ("train.bin", "val.bin", "meta.json")), (4, ("sft_train.jsonl", "sft_eval.jsonl"))):
        (tmp_path / "out" / "quick" / f"step{step}").mkdir(parents=True)
        for name in names:
            shutil.copy(files / name, tmp_path / "out" / "quick" / f"step{step}" / name)
    args = ["--quick", "--tokenizer", str(files / "tokenizer.json"), "--pretrain_seeds", "0", "--sft_seeds", "0", "1",
            "--sft_args", "--max_steps 20"]
    table = seed_table.main(args)
    runs = table["runs"]
    assert [(r["pretrain_seed"], r["sft_seed"]) for r in runs] == [(0, 0), (0, 1)]
    assert runs[0]["sft_val_loss"] != runs[1]["sft_val_loss"]  # the fine-tuning seed changes the run
    assert runs[0]["pretrain_val_loss"] == runs[1]["pretrain_val_loss"]  # one base, shared
    for key, stats in table["summary"].items():
        values = [r[key] for r in runs]
        assert stats == {"mean": sum(values) / 2, "min": min(values), "max": max(values)}
    assert [p["step"] for p in runs[0]["name_copying"]] == [10, 20]  # a probe at every evaluation
    markdown = (table["out"] / "seed_table.md").read_text()
    assert sum(line.startswith(("| 0 | 0 |", "| 0 | 1 |", "| mean |", "| min |", "| max |"))
               for line in markdown.splitlines()) == 5

    smear = seed_table.main(args[:-5] + ["--sft_seeds", "0", "--sft_args", "--max_steps 10", "--label", "smear",
                                         "--pretrain_args=--smear_keys"])  # another base: its own folder
    base = torch.load(table["out"].parent / "pretrain_seed0_smear" / "model.pt", weights_only=True)
    assert base["config"]["smear_keys"] and any(k.endswith(".smear") for k in base["model"])
    assert smear["runs"][0]["pretrain_val_loss"] != runs[0]["pretrain_val_loss"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(train_sft, "main", no_training)
    monkeypatch.setattr("step3_pretrain.train_pretrain.main", no_training)
    assert seed_table.main(args)["runs"] == runs


    lora = seed_table.main(args[:-2] + ["--sft_args", "--max_steps 10", "--sft_seeds", "0", "--lora", "4",
                                        "--label", "lora4"])  # the base above is read back, not trained again
    assert (table["out"].parent / "lora4" / "pretrain0_sft0" / "lora_adapter.pt").exists()
    assert lora["runs"][0]["pretrain_val_loss"] == runs[0]["pretrain_val_loss"]
    assert [p["step"] for p in lora["runs"][0]["name_copying"]] == [10]
