"""Training and measuring a Retro model on a RetroSplit: what train_retro.py (pretraining on re-drawn
worlds), sft_retro.py (instruction tuning) and eval_retrieval.py (the Retro rows) share.

    result = fit(model, split, val, settings, seed, "retro_from_scratch", out_dir, device, eval_rows=60)
    figures = measure(model, val, "retrieved")   # or "off" (retrieval off), "random" (another world's chunks)
    figures["loss"], figures["ppl"], figures["fact_ppl"], figures["fact_acc"]

Training is the shared loop (common/train.py) with a batch function that draws random rows of the
split and their neighbours; the loss is the model's own, over the scored targets only.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from common.model import IGNORE_INDEX
from common.train import TrainConfig, train
from step5_retro.retro_model import NO_TOKEN, RetroModel

TRAIN_KEYS = ("max_steps", "batch_size", "lr", "warmup_steps", "eval_every", "ckpt_every")
NEIGHBOUR_MODES = ("retrieved", "off", "random")  # what the Retro model reads at validation


@torch.no_grad()
def measure(model, split, neighbours: str = "retrieved", rows: int | None = None, batch_size: int = 16) -> dict:
    """Loss and perplexity on split's rows (all targets, fact targets, the rest) and top-1 accuracy on
    facts. neighbours: "retrieved", "off" (none) or "random"; a plain Transformer reads none."""
    model.eval()
    device = next(model.parameters()).device
    n = len(split.rows) if rows is None else min(rows, len(split.rows))
    sums = {"all": [0.0, 0], "fact": [0.0, 0], "rest": [0.0, 0]}
    correct = 0
    for first in range(0, n, batch_size):
        index = np.arange(first, min(first + batch_size, n))
        batch = {k: v.to(device) for k, v in split.batch(index, random_neighbours=neighbours == "random").items()}
        if isinstance(model, RetroModel) and neighbours != "off":
            logits, _ = model(batch["idx"], neighbours=batch["neighbours"])
        else:
            logits, _ = model(batch["idx"])
        nll = F.cross_entropy(logits.float().transpose(1, 2), batch["targets"], reduction="none",
                              ignore_index=IGNORE_INDEX)
        fact = torch.from_numpy(split.fact[index]).to(device)
        scored = torch.from_numpy(split.scored[index]).to(device)
        for name, mask in (("all", scored), ("fact", fact), ("rest", scored & ~fact)):
            sums[name][0] += float(nll[mask].sum())
            sums[name][1] += int(mask.sum())
        correct += int((logits.argmax(-1) == batch["targets"])[fact].sum())
    out = {}
    for name, (total, count) in sums.items():
        loss = total / max(count, 1)
        prefix = "" if name == "all" else name + "_"
        out[prefix + "loss"], out[prefix + "ppl"] = round(loss, 4), round(math.exp(loss), 3)
    out["fact_acc"] = round(correct / max(sums["fact"][1], 1), 4)
    return out


def batch_fn(split, batch_size: int, seed: int, with_neighbours: bool, retrieval_dropout: float = 0.0):
    """The micro-batch of (step, micro): random rows, a pure function of its arguments (exact resume).
    retrieval_dropout: the share of rows that read no neighbour (all NO_TOKEN: CCA gives them zeros),
    so the decoder also learns to do without, as it must with retrieval off."""
    def fn(step, micro):
        rng = np.random.default_rng([seed, step, micro])
        index = rng.integers(0, len(split.rows), size=batch_size)
        batch = split.batch(index)
        if not with_neighbours:
            return {"idx": batch["idx"], "targets": batch["targets"]}
        batch["neighbours"][torch.from_numpy(rng.random(batch_size) < retrieval_dropout)] = NO_TOKEN
        return batch
    return fn


def fit(model, split, val, settings: dict, seed: int, name: str, out_dir, device, resume=False, meta=None,
        eval_rows: int | None = None, plot_path=None) -> dict:
    """Train on split with the shared loop; validation loss on val's first eval_rows rows (with their
    neighbours for a Retro model). settings: the TRAIN_KEYS and retrieval_dropout (default 0)."""
    cfg = TrainConfig(**{k: settings[k] for k in TRAIN_KEYS})
    neighbours = isinstance(model, RetroModel)
    return train(model, cfg, batch_fn(split, cfg.batch_size, seed, neighbours, settings.get("retrieval_dropout", 0.0)),
                 device=device,
                 checkpoint_path=out_dir / f"{name}_checkpoint.pt",
                 eval_fn=lambda m: measure(m, val, "retrieved" if neighbours else "off", eval_rows)["loss"],
                 resume=resume, checkpoint_meta=meta, desc=name, plot_path=plot_path)
