"""Train the byte-level BPE tokenizer that every later step uses.

    python step1_tokenizer/train_tokenizer.py                 # default corpus, 4096 tokens
    python step1_tokenizer/train_tokenizer.py --quick         # seconds: small corpus, 512 tokens
    python step1_tokenizer/train_tokenizer.py --input notes.txt --vocab_size 2000 --out out/notes_tok.json

Writes the tokenizer (readable JSON, default out/tokenizer.json) and, for that tutorial
tokenizer, the step's figures to out/step1/metrics.json; a tokenizer written elsewhere (--out)
only prints its figures.
"""
import sys
import pathlib

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import time

from common.cli import add_common_args, next_command, run_main
from common.metrics import write_metrics
from step1_tokenizer.bpe import DEFAULT_SPECIAL_TOKENS, Tokenizer, default_tokenizer_path, train_bpe
from common.world.corpus import default_documents, read_documents, split_heldout

DEFAULT_VOCAB_SIZE = 4096
QUICK_VOCAB_SIZE = 512
SPEED_SAMPLE_BYTES = 1_000_000  # encode about this much text to measure speed


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Learn BPE merges from a corpus and save the tokenizer as JSON.")
    parser.add_argument("--input", type=pathlib.Path, default=None,
                        help="train on this file instead of the generated corpus: UTF-8 text "
                             "(one document per blank-line block) or .jsonl with {\"text\": ...} per line")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help=f"256 bytes + merges + {len(DEFAULT_SPECIAL_TOKENS)} special tokens "
                             f"(default {DEFAULT_VOCAB_SIZE}, or {QUICK_VOCAB_SIZE} with --quick)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="where to write the tokenizer (default: out/tokenizer.json)")
    # --quick; --seed picks the generated world (BPE itself has no randomness); --device is unused here
    add_common_args(parser)
    return parser.parse_args(argv)


def num_bytes(docs):
    return sum(len(d.encode("utf-8")) for d in docs)


def measure(tokenizer_path, heldout_docs, train_docs):
    """Bytes per token on held-out text, and encoding speed of a freshly loaded
    tokenizer (its chunk cache starts empty, as in a new program)."""
    tok = Tokenizer.load(tokenizer_path)
    n_tokens = sum(len(tok.encode(d)) for d in heldout_docs)
    bytes_per_token = num_bytes(heldout_docs) / max(1, n_tokens)

    sample, size = [], 0  # held-out docs first, topped up with training docs
    for doc in heldout_docs + train_docs:
        if size >= SPEED_SAMPLE_BYTES:
            break
        sample.append(doc)
        size += len(doc.encode("utf-8"))
    fresh = Tokenizer.load(tokenizer_path)
    start = time.perf_counter()
    for doc in sample:
        fresh.encode(doc)
    seconds = time.perf_counter() - start
    return bytes_per_token, size / 1e6 / max(seconds, 1e-9)


def main(argv=None):
    args = parse_args(argv)
    vocab_size = args.vocab_size or (QUICK_VOCAB_SIZE if args.quick else DEFAULT_VOCAB_SIZE)

    if args.input is not None:
        train_docs, heldout_docs = split_heldout(read_documents(args.input))
        source = str(args.input)
    else:
        train_docs, heldout_docs = default_documents(quick=args.quick, seed=args.seed)
        quick = ", --quick" if args.quick else ""
        source = f"the generated corpus: world text, quiz pages, skill text (seed {args.seed}{quick})"
    if not heldout_docs:  # a file with a single document: measure on the training text
        heldout_docs = train_docs
    print(f"training on {source}: {len(train_docs)} documents, {num_bytes(train_docs) / 1e6:.2f} MB, "
          f"vocab_size {vocab_size}")

    start = time.perf_counter()
    tok = train_bpe(train_docs, vocab_size, progress=True)
    train_seconds = time.perf_counter() - start
    if tok.vocab_size < vocab_size:
        print(f"note: after {len(tok.merges)} merges every chunk of the text is a single token, so "
              f"there is nothing left to merge: vocab_size is {tok.vocab_size}, not {vocab_size}")
    print(f"vocab_size {tok.vocab_size} = 256 bytes + {len(tok.merges)} merges "
          f"+ {len(tok.special_tokens)} special tokens")
    args.out = args.out or default_tokenizer_path()  # after parsing: --quick moves it to out/quick/
    tok.save(args.out)

    bytes_per_token, mb_per_s = measure(args.out, heldout_docs, train_docs)
    results = {
        "trained_on": source,
        "vocab_size": tok.vocab_size,
        "num_merges": len(tok.merges),
        "train_mb": round(num_bytes(train_docs) / 1e6, 3),
        "train_seconds": round(train_seconds, 2),
        "bytes_per_token": round(bytes_per_token, 3),
        "encode_mb_per_s": round(mb_per_s, 2),
    }
    is_default = pathlib.Path(args.out).resolve() == pathlib.Path(default_tokenizer_path()).resolve()
    if is_default:
        write_metrics(1, results)  # the tutorial's tokenizer; another one (--out) leaves step 1's figures alone
    print(f"trained in {train_seconds:.1f} s; held-out text: {bytes_per_token:.2f} bytes per token; "
          f"encoding: {mb_per_s:.1f} MB/s")
    print("longest tokens:", ", ".join(
        repr(tok.decode([i])) for i in sorted(range(256, 256 + len(tok.merges)),
                                              key=lambda i: -len(tok.token_bytes(i)))[:8]))
    show = "python step1_tokenizer/show_tokens.py"
    show += "" if is_default else f" --tokenizer {args.out}"
    print(f"saved {args.out}; next: {next_command(show)}")
    return results


if __name__ == "__main__":
    run_main(main)
