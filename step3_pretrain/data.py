"""Pretraining data: text -> one long stream of token ids on disk.

    python step3_pretrain/data.py            # the generated corpus (the text step 1 trained on)
    python step3_pretrain/data.py --input my.txt   # any UTF-8 text, or JSONL with {"text": ...}: out/step3/my/
    python step3_pretrain/data.py --echo_games 20000 --out out/echo_only   # only copying

Writes out/step3/train.bin and val.bin (token ids, uint16 when the vocabulary
fits, else uint32) and meta.json. Every document ends with <|endoftext|>, so
the model learns where documents stop. The split is by whole documents, so no
validation text was seen during training.

The files are memory-mapped when read: a corpus far larger than RAM works the
same, and a training batch is just a slice of the array.
"""
import argparse
import json
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from common.checkpoint import atomic_write_text
from common.cli import UserError, add_common_args, next_command, run_main
from common.paths import own_data_dir, step_dir
from common.world.corpus import HELDOUT_FRACTION, default_documents, read_documents, split_heldout
from common.world.skills import echo_documents
from common.world.world import build_world
from step1_tokenizer.bpe import default_tokenizer_path, load_tokenizer, tokenizer_fingerprint

MAKE_DATA = "python step3_pretrain/data.py"


def encode_documents(tokenizer, docs: list[str], desc: str) -> np.ndarray:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    ids: list[int] = []
    for doc in tqdm(docs, desc=desc, unit="doc", leave=False):
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eot_id)
    return np.array(ids, dtype=dtype)


def prepare(data_dir, tokenizer_path=None, input_path=None, quick=False, echo_games=0) -> dict:
    """Tokenize the corpus into data_dir/{train,val}.bin and meta.json; return the meta.
    echo_games: instead of the corpus, this many echo games (skills.echo_documents)."""
    tokenizer_path = pathlib.Path(tokenizer_path or default_tokenizer_path())
    tokenizer = load_tokenizer(tokenizer_path)
    source = input_path or (f"{echo_games} echo games" if echo_games else "generated corpus")
    if input_path:
        train_docs, val_docs = split_heldout(read_documents(input_path))
    elif echo_games:
        world = build_world(0, "quick" if quick else "default")
        train_docs, val_docs = split_heldout(echo_documents(world, echo_games))
    else:
        train_docs, val_docs = default_documents(quick=quick)
    if not val_docs:
        every = round(1 / HELDOUT_FRACTION)  # split_heldout keeps one document in `every` for validation
        raise UserError(f"{source}: {len(train_docs)} documents, but at least {every} different ones "
                        f"(separated by blank lines) are needed: one in {every} is held out for validation")
    data_dir = pathlib.Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    meta = {"tokenizer": str(tokenizer_path), "tokenizer_sha": tokenizer_fingerprint(tokenizer_path),
            "vocab_size": tokenizer.vocab_size, "source": str(source), "quick": quick}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        tokens = encode_documents(tokenizer, docs, split)
        tokens.tofile(data_dir / f"{split}.bin")
        meta[split] = {"tokens": int(tokens.size), "documents": len(docs),
                       "bytes": sum(len(d.encode("utf-8")) for d in docs)}
    meta["dtype"] = str(tokens.dtype)
    atomic_write_text(data_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def random_windows(tokens, block_size: int, batch_size: int, seed: int, step: int, micro: int) -> dict:
    """The micro-batch `micro` of step `step`: random windows, a pure function of its arguments.

    Seeding from (seed, step, micro) instead of drawing from a running generator is what
    makes --resume exact and lets each DDP rank draw its own share without talking to the others.
    """
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
    window = torch.from_numpy(np.stack([np.asarray(tokens[s:s + block_size + 1], dtype=np.int64) for s in starts]))
    return {"idx": window[:, :-1], "targets": window[:, 1:]}


def load_tokens(data_dir, split: str, tokenizer_path=None):
    """Memory-map data_dir/{split}.bin after checking it matches the tokenizer in use."""
    data_dir = pathlib.Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.exists():
        raise UserError(f"{meta_path}: no tokenized data; run {next_command(MAKE_DATA)}")
    meta = json.loads(meta_path.read_text())
    tokenizer_path = pathlib.Path(tokenizer_path or default_tokenizer_path())
    if tokenizer_path.exists() and tokenizer_fingerprint(tokenizer_path) != meta["tokenizer_sha"]:
        raise UserError(f"{data_dir / (split + '.bin')} was made with a different tokenizer than "
                        f"{tokenizer_path}; run {next_command(MAKE_DATA)} again")
    path = data_dir / f"{split}.bin"
    expected = meta[split]["tokens"] * np.dtype(meta["dtype"]).itemsize
    if not path.exists() or path.stat().st_size != expected:
        raise UserError(f"{path}: missing or of the wrong size (expected {expected} bytes); "
                        f"run {next_command(MAKE_DATA)}")
    return np.memmap(path, dtype=meta["dtype"], mode="r"), meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="a UTF-8 text file (documents separated by blank lines) or JSONL with "
                                        '{"text": ...}; default: the generated corpus '
                                        "(world text, quiz pages, skill text)")
    parser.add_argument("--echo_games", type=int, default=0, metavar="N",
                        help="instead of the corpus, N echo games: rows of random words said and said back, "
                             "text that only copying predicts (EXPERIMENTS.md, 'Can more text teach copying?')")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--out", default=None, help="folder for train.bin, val.bin, meta.json (default out/step3; "
                                                    "with --input FILE: out/step3/<FILE's name>)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.input and args.echo_games:
        raise UserError("give --input or --echo_games, not both")
    if args.echo_games and not args.out:  # never replace the tokens step 3 trains on by default
        raise UserError("--echo_games makes a corpus of its own: give it a folder of its own, "
                        "e.g. --out out/echo_only (out/step3 holds the corpus step 3 trains on)")
    # Other text gets a folder of its own: the tutorial's tokens (and the model trained on them) stay.
    out_dir = pathlib.Path(args.out or (own_data_dir(3, args.input) if args.input else step_dir(3)))
    meta = prepare(out_dir, args.tokenizer, args.input, args.quick, args.echo_games)
    for split in ("train", "val"):
        info = meta[split]
        print(f"{split}: {info['documents']:,} documents, {info['bytes']:,} bytes -> {info['tokens']:,} tokens "
              f"({info['bytes'] / info['tokens']:.2f} bytes/token)")
    if out_dir != step_dir(3):
        print(f"wrote {out_dir}; next: {next_command(f'python step3_pretrain/train_pretrain.py --data {out_dir}')}")
    return meta


if __name__ == "__main__":
    run_main(main)
