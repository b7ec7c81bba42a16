"""Let a pretrained model write: sample text from a checkpoint.

    python step3_pretrain/sample.py                          # 3 samples from out/step3/model.pt
    python step3_pretrain/sample.py --prompt "Talvor is" --temperature 0.8 --top_k 50

A pretrained model only continues text; it does not answer questions yet (that is step 4).
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch

from common.checkpoint import load_model
from common.cli import add_common_args, run_main
from common.device import pick_device
from common.paths import step_dir
from step1_tokenizer.bpe import load_tokenizer_with_fingerprint


def sample_texts(model, tokenizer, prompt: str = "", n: int = 3, max_new_tokens: int = 120,
                 temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None, seed: int = 0):
    """n continuations of `prompt` (or of a document start, when empty), stopping at <|endoftext|>."""
    device = next(model.parameters()).device
    ids = [tokenizer.eot_id] + tokenizer.encode(prompt)  # <|endoftext|> first: "a new document starts here"
    idx = torch.tensor([ids] * n, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         stop_tokens=[tokenizer.eot_id], generator=generator)
    model.train(was_training)
    texts = []
    for row in out[:, 1:].tolist():
        if tokenizer.eot_id in row[len(ids) - 1:]:
            row = row[:row.index(tokenizer.eot_id, len(ids) - 1)]
        texts.append(tokenizer.decode(row))
    return texts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model file (default out/step3/model.pt)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--n", type=int, default=3, help="number of samples")
    parser.add_argument("--max_new_tokens", type=int, default=150)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random")
    parser.add_argument("--top_k", type=int, default=50, help="sample only among the k likeliest tokens")
    parser.add_argument("--top_p", type=float, default=None, help="sample among the likeliest tokens "
                                                                  "whose probabilities add up to p")
    add_common_args(parser)
    args = parser.parse_args(argv)
    tokenizer, fingerprint = load_tokenizer_with_fingerprint(args.tokenizer)
    model = load_model(args.checkpoint or step_dir(3) / "model.pt", pick_device(args.device),
                       tokenizer_fingerprint=fingerprint)
    texts = sample_texts(model, tokenizer, args.prompt, args.n, args.max_new_tokens,
                         args.temperature, args.top_k, args.top_p, args.seed)
    for i, text in enumerate(texts, 1):
        print(f"--- sample {i} ---\n{text}\n")
    return texts


if __name__ == "__main__":
    run_main(main)
