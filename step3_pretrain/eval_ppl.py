"""How good is a language model? Loss, perplexity and bits per byte.

    python step3_pretrain/eval_ppl.py                       # the validation split of step 3's data
    python step3_pretrain/eval_ppl.py --input some_text.txt # any UTF-8 text file

- loss: mean negative log-likelihood of each next token, in nats.
- perplexity = exp(loss): the model is as unsure as a fair choice among that many tokens.
- bits per byte (bpb) = total loss in bits / number of UTF-8 bytes of the text. Loss per token
  depends on the tokenizer (bigger tokens, fewer of them); per byte it does not, so bpb
  compares models with different tokenizers. 8 bits/byte is knowing nothing about the byte.
"""
import argparse
import math
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from common.checkpoint import load_model
from common.cli import UserError, add_common_args, run_main
from common.device import pick_device
from common.paths import step_dir
from common.world.corpus import read_documents


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for; special tokens count 0 (they are not text)."""
    lengths = np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=np.int64)
    lengths[list(tokenizer.special_tokens.values())] = 0
    return lengths


@torch.no_grad()
def evaluate_stream(model, tokens, byte_lengths: np.ndarray, block_size: int, batch_size: int = 8,
                    max_tokens: int | None = None, device=torch.device("cpu")) -> dict:
    """Score a token stream in consecutive non-overlapping windows of block_size+1 tokens."""
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    n_windows = (n - 1) // block_size
    if n_windows == 0:
        raise UserError(f"the text has {len(tokens)} tokens, fewer than one window of {block_size + 1}")
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    was_training = model.training
    model.eval()
    for first in range(0, n_windows, batch_size):
        starts = range(first * block_size, min(first + batch_size, n_windows) * block_size, block_size)
        window = torch.from_numpy(np.stack([np.asarray(tokens[s:s + block_size + 1], dtype=np.int64)
                                            for s in starts]))
        x, y = window[:, :-1].to(device), window[:, 1:]
        logits, _ = model(x)
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum")
        total_nats += nats.item()
        total_tokens += y.numel()
        total_bytes += int(byte_lengths[y.numpy()].sum())
    model.train(was_training)
    loss = total_nats / total_tokens
    return {"loss": loss, "ppl": math.exp(loss), "bpb": total_nats / math.log(2) / max(total_bytes, 1),
            "tokens": total_tokens, "bytes": total_bytes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model file (default out/step3/model.pt)")
    parser.add_argument("--input", default=None, help="text file to score (default: step 3's validation split)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--max_tokens", type=int, default=200_000, help="score at most this many tokens")
    add_common_args(parser)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    from step1_tokenizer.bpe import load_tokenizer_with_fingerprint

    tokenizer, fingerprint = load_tokenizer_with_fingerprint(args.tokenizer)
    model = load_model(args.checkpoint or step_dir(3) / "model.pt", device, tokenizer_fingerprint=fingerprint)
    if args.input:
        tokens = []
        for doc in read_documents(args.input):
            tokens += tokenizer.encode(doc) + [tokenizer.eot_id]
        tokens = np.array(tokens, dtype=np.int64)
    else:
        from step3_pretrain.data import load_tokens
        tokens, _ = load_tokens(step_dir(3), "val", args.tokenizer)
    result = evaluate_stream(model, tokens, token_byte_lengths(tokenizer), model.config.block_size,
                             max_tokens=args.max_tokens, device=device)
    print(f"{result['tokens']:,} tokens ({result['bytes']:,} bytes): loss {result['loss']:.3f} nats/token, "
          f"perplexity {result['ppl']:.2f}, {result['bpb']:.3f} bits/byte")
    return result


if __name__ == "__main__":
    run_main(main)
