"""The model cannot peek at the future: changing token t+1 never changes the logits at positions <= t.

    python step2_model/causality_check.py
    python step2_model/causality_check.py --tokens 32 --checkpoint out/step3/model.pt

For each position t, the script replaces token t+1 by another one, runs the
model again, and measures how much the logits moved at positions 0..t (must
be exactly 0: the causal mask hides t+1 from them) and at positions t+1..T-1
(they do move: those positions can see the change). This is what makes
next-token training honest -- the answer at position t is token t+1, so
position t must never see it -- and it is what the KV cache relies on: the
keys and values of earlier tokens never change when later tokens arrive.
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch

from common.checkpoint import load_model
from common.cli import UserError, add_common_args, run_main
from common.device import pick_device
from common.model import QUICK_CONFIG, ModelConfig, Transformer
from common.seed import seed_everything


@torch.no_grad()
def logit_changes(model, idx) -> list[dict]:
    """For each t: the largest logit change at positions <= t and > t when token t+1 changes."""
    base, _ = model(idx)
    rows = []
    for t in range(idx.size(1) - 1):
        changed = idx.clone()
        changed[0, t + 1] = (changed[0, t + 1] + 1) % model.config.vocab_size  # any other token
        logits, _ = model(changed)
        diff = (logits - base).abs()[0].amax(dim=-1)  # (T,) largest change at each position
        rows.append({"t": t, "max_change_up_to_t": diff[:t + 1].max().item(),
                     "max_change_after_t": diff[t + 1:].max().item()})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16, help="length of the random test sequence (default 16)")
    parser.add_argument("--checkpoint", default=None,
                        help="model file to test (default: a randomly initialised model)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    seed_everything(args.seed)
    device = pick_device(args.device)
    if args.checkpoint:
        model = load_model(args.checkpoint, device)
    else:
        model = Transformer(QUICK_CONFIG if args.quick else ModelConfig()).to(device).eval()
    if not 2 <= args.tokens <= model.config.block_size:
        raise UserError(f"--tokens {args.tokens} must be between 2 and the block size {model.config.block_size}")
    idx = torch.randint(0, model.config.vocab_size, (1, args.tokens), device=device)

    rows = logit_changes(model, idx)
    print(f"{'change token':>12} {'max |logit change| at positions <= t':>38} {'... at positions > t':>21}")
    for row in rows:
        print(f"{row['t'] + 1:>12} {row['max_change_up_to_t']:>38.3g} {row['max_change_after_t']:>21.3g}")
    worst_before = max(r["max_change_up_to_t"] for r in rows)
    smallest_after = min(r["max_change_after_t"] for r in rows)
    # 0 exactly on this CPU; allow float noise from other hardware's kernels
    causal = worst_before <= 1e-6 and smallest_after > 1e-6
    print(f"\nlargest change at or before t: {worst_before:.3g}; smallest largest-change after t: "
          f"{smallest_after:.3g} -> {'causal' if causal else 'NOT causal'}")
    return {"rows": rows, "worst_before": worst_before, "smallest_after": smallest_after, "causal": causal}


if __name__ == "__main__":
    run_main(main)
