"""Supervised fine-tuning, the parts every fine-tuning script shares: the flags, the setup
(tokenizer, pretrained model, conversations, replayed text), the loss and the training run.

    run = setup(args, PROFILES)          # after parser = add_sft_args(argparse.ArgumentParser(), PROFILES)
    result = run_sft(run["model"], run, seed=0, resume=False, name="sft")

train_sft.py trains every weight, train_lora.py only LoRA's matrices; both are thin scripts
around this module. Pretraining and SFT use the same model, the same next-token loss and the
same training loop (common/train.py); only the data and the loss mask differ.

Replay: each batch also carries a few rows of step 3's world text, trained on every token at a
fifth of the answers' weight, so that fine-tuning does not erase what pretraining taught
(step4_sft/EXPERIMENTS.md measures what it keeps).
"""

if __name__ == "__main__":  # run as a file: say what this is, before the imports below fail
    raise SystemExit("step4_sft/sft.py is a module, not a script: "
                     "step4_sft/train_sft.py and step4_sft/train_lora.py use it")

import argparse
import pathlib

import torch

from common.checkpoint import check_vocab, load_model
from common.cli import UserError, add_common_args
from common.device import pick_device
from common.distributed import init_distributed
from common.model import IGNORE_INDEX, cross_entropy_loss
from common.paths import own_data_dir, step_dir
from common.seed import seed_everything
from common.train import TrainConfig, resolve_profile, train
from common.world.corpus import world_training_documents
from step1_tokenizer.bpe import load_tokenizer_with_fingerprint
from step3_pretrain.data import encode_documents, load_tokens
from step4_sft.blend import blend_name, is_blend, load_blend
from step4_sft.data import collate, load_examples, sft_batch, steps_for_epochs

MAKE_BASE = "python step3_pretrain/train_pretrain.py"
REPLAY_WEIGHT = 0.2  # the replayed text's loss counts a fifth as much as the answers' (see sft_loss)
# Any flag given on the command line wins over its profile. Fine-tuning moves a trained model
# a little: a smaller learning rate than pretraining. The step count is chosen by measurement
# (step4_sft/EXPERIMENTS.md, "How long to fine-tune"), inside the 10-minute budget.
# batch_size counts conversations; --replay_rows (default a third of that) rows of pretraining text come on top.
PROFILES = {
    "quick": dict(max_steps=30, batch_size=8, grad_accum=1, lr=1e-3, warmup_steps=5, eval_every=0, ckpt_every=0),
    "default": dict(max_steps=1000, batch_size=12, grad_accum=1, lr=1e-3, warmup_steps=30, eval_every=200,
                    ckpt_every=200),
    "gpu": dict(max_steps=1000, batch_size=64, grad_accum=1, lr=5e-4, warmup_steps=50, eval_every=200,
                ckpt_every=500),
}
TRAIN_KEYS = tuple(PROFILES["default"])
# LoRA (train_lora.py, lora_sweep.py) trains far fewer numbers, each of which must move further: a
# larger learning rate than full fine-tuning (10x, chosen by a sweep in step4_sft/EXPERIMENTS.md), and
# no weight decay (it would pull B A back towards "no change").
LORA_PROFILES = {name: {**p, "lr": p["lr"] * 10} for name, p in PROFILES.items()}
# And more steps: a LoRA step costs less than a full SFT step (no replayed rows, no optimizer
# state for the frozen weights), and its loss is still falling where full SFT stops
# (step4_sft/EXPERIMENTS.md, still under 10 minutes).
LORA_PROFILES["default"] = {**LORA_PROFILES["default"], "max_steps": 1500}


def add_sft_args(parser: argparse.ArgumentParser, profiles: dict) -> argparse.ArgumentParser:
    """The flags train_sft.py and train_lora.py share."""
    parser.add_argument("--checkpoint", default=None, help="pretrained model (default out/step3/model.pt)")
    parser.add_argument("--data", default=None,
                        help="training conversations, JSONL in any format data.py reads (default "
                             "out/step4/sft_train.jsonl); several files blended by weight: a.jsonl:0.7,b.jsonl:0.3")
    parser.add_argument("--eval_data", default=None,
                        help="held-out conversations for the validation loss (default out/step4/sft_eval.jsonl)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--out", default=None, help="output folder (default out/step4; with --data FILE: "
                                                    "out/step4/<FILE's name>, so the tutorial's model stays)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad line of the data")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run exactly (give the same flags as the run had)")
    parser.add_argument("--epochs", type=float, default=None, metavar="N",
                        help="train for N passes over the training conversations, each in a new shuffled "
                             "order, instead of --max_steps steps of conversations drawn at random")
    parser.add_argument("--replay_rows", type=int, default=None,
                        help="rows of pretraining text added to each batch of conversations, so fine-tuning "
                             "does not erase what pretraining taught; 0 turns replay off (default: a third "
                             "of --batch_size, 4 with the default 12)")
    parser.add_argument("--replay_weight", type=float, default=REPLAY_WEIGHT,
                        help=f"weight of the replayed text's mean loss beside the answers' (default {REPLAY_WEIGHT})")
    parser.add_argument("--replay_data", default=None,
                        help="replay the tokens in this folder's train.bin (made by step3_pretrain/data.py, "
                             "e.g. out/step3 for all of step 3's text) instead of the default: the world "
                             "documents of step 3's generated corpus")
    for key in TRAIN_KEYS:
        parser.add_argument(f"--{key}", type=type(profiles["default"][key]), default=None,
                            help=f"default {profiles['default'][key]} (quick: {profiles['quick'][key]})")
    add_common_args(parser)
    return parser


def setup(args, profiles: dict) -> dict:
    """Device, settings, tokenizer, the pretrained model and the tokenized data."""
    if args.epochs is not None and args.max_steps is not None:
        raise UserError("--epochs and --max_steps cannot be given together: --epochs N sets the steps "
                        "(N passes over the training conversations); give one of them")
    if args.epochs is not None and args.epochs <= 0:
        raise UserError(f"--epochs must be more than 0, not {args.epochs:g}")
    device = pick_device(args.device)
    dist = init_distributed(device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    seed_everything(args.seed)

    default_data = step_dir(4) / "sft_train.jsonl"
    blended = args.data is not None and is_blend(args.data)  # "a.jsonl:0.7,b.jsonl:0.3": several files by weight
    data_path = pathlib.Path(blend_name(args.data) if blended else (args.data or default_data))
    own_data = blended or data_path.resolve() != default_data.resolve()
    out_dir = pathlib.Path(args.out or (own_data_dir(4, data_path) if own_data else step_dir(4)))
    tokenizer, fingerprint = load_tokenizer_with_fingerprint(args.tokenizer)
    model = load_model(args.checkpoint or step_dir(3) / "model.pt", device, hint=MAKE_BASE,
                       tokenizer_fingerprint=fingerprint)
    check_vocab(model.config, tokenizer)
    max_tokens = model.config.block_size + 1  # inputs and targets are both block_size long after the shift

    def load(path):
        return load_examples(path, tokenizer, max_tokens, strict=args.strict, verbose=dist.is_main)
    examples = load_blend(args.data, load, args.seed, verbose=dist.is_main) if blended else load(data_path)
    settings = run_settings(args, device, profiles, len(examples), dist.world_size)
    micros_per_step = settings["grad_accum"] * dist.world_size
    eval_path = pathlib.Path(args.eval_data or step_dir(4) / "sft_eval.jsonl")
    val_examples = (load_examples(eval_path, tokenizer, max_tokens, verbose=False)
                    if args.eval_data or eval_path.exists() else [])
    replay_rows = settings["batch_size"] // 3 if args.replay_rows is None else args.replay_rows
    if replay_rows < 0:
        raise UserError(f"--replay_rows must be 0 or more, not {replay_rows}")
    replay_tokens = None
    if replay_rows and args.replay_data:
        replay_tokens = load_tokens(args.replay_data, "train", args.tokenizer)[0]
    elif replay_rows:
        # The world text only, not the skill text: its random names and numbers, which no model can
        # predict, push against the copying SFT teaches (step4_sft/EXPERIMENTS.md).
        replay_tokens = encode_documents(tokenizer, world_training_documents(quick=args.quick), "replay text")
    if replay_rows and len(replay_tokens) <= max_tokens:
        raise UserError(f"the replay text has only {len(replay_tokens)} tokens, fewer than the context "
                        f"({max_tokens}); pass --replay_rows 0 or a longer --replay_data")
    if dist.is_main and own_data and not args.out:
        print(f"writing to {out_dir} (a run on other data never replaces {step_dir(4)}'s model; --out DIR to choose)")
    if dist.is_main:
        print(f"{len(examples):,} training conversations from {args.data if blended else data_path}, "
              f"{sum(sum(e.mask) for e in examples):,} assistant tokens; each batch: {settings['batch_size']} "
              f"conversations + {replay_rows} rows of pretraining text")
        epochs = settings["max_steps"] * settings["batch_size"] * micros_per_step / len(examples)
        print(f"{settings['max_steps']:,} steps = {epochs:.2f} epochs "
              + ("(each conversation once per epoch, in a shuffled order)" if args.epochs is not None
                 else "of conversations drawn at random (--epochs N: passes in a shuffled order instead)"))
    return dict(device=device, dist=dist, settings=settings, out_dir=out_dir, tokenizer=tokenizer,
                tokenizer_fingerprint=fingerprint,
                model=model, examples=examples, val_examples=val_examples,
                micros_per_step=micros_per_step if args.epochs is not None else None,
                replay_tokens=replay_tokens, replay_rows=replay_rows, replay_weight=args.replay_weight)


def run_settings(args, device, profiles: dict, n_examples: int, world_size: int = 1) -> dict:
    """The profile's settings with the user's flags on top; with --epochs, the steps those epochs take."""
    settings = resolve_profile(args, device, profiles)
    if args.epochs is not None:
        settings["max_steps"] = steps_for_epochs(n_examples, args.epochs, settings["batch_size"],
                                                 settings["grad_accum"] * world_size)
    return settings


@torch.no_grad()
def assistant_loss(model, examples, pad_id: int, batch_size: int = 16) -> float:
    """Mean loss per assistant token over `examples`: the validation loss."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for first in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[first:first + batch_size], pad_id).items()}
        n = int((batch["targets"] != IGNORE_INDEX).sum())
        total += float(model(**batch)[1]) * n
        count += n
    return total / max(count, 1)


def sft_loss(model, batch: dict, replay_weight: float = REPLAY_WEIGHT):
    """Mean loss over the assistant tokens of the conversations, plus replay_weight times the
    mean loss over the replayed pretraining rows (batch["replay"] marks them), if any.
    Two means, not one over all tokens: the replayed rows hold more tokens than the answers
    and would otherwise outweigh them (step4_sft/EXPERIMENTS.md measures it)."""
    logits, _ = model(batch["idx"])
    replay, targets = batch["replay"], batch["targets"]
    loss = cross_entropy_loss(logits[~replay], targets[~replay])
    if replay.any():
        loss = loss + replay_weight * cross_entropy_loss(logits[replay], targets[replay])
    return loss


def run_sft(model, run: dict, seed: int, resume: bool, name: str, weight_decay: float | None = None,
            probe=None) -> dict:
    """Train with the shared loop on random padded batches of conversations; return its figures.
    probe(model): called at every evaluation too, to follow something over training (seed_table.py
    follows name copying); it keeps what it measures itself."""
    settings, examples, pad_id = run["settings"], run["examples"], run["tokenizer"].eot_id
    cfg = TrainConfig(**{k: settings[k] for k in TRAIN_KEYS})
    if weight_decay is not None:
        cfg.weight_decay = weight_decay
    val = run["val_examples"][::max(1, len(run["val_examples"]) // 200)]  # every kind of task, ~200 conversations

    def evaluate(m) -> float:
        if probe is not None:
            probe(m)
        return assistant_loss(m, val, pad_id)

    return train(
        model, cfg,
        lambda step, micro: sft_batch(examples, cfg.batch_size, pad_id, seed, step, micro,
                                      run["replay_tokens"], run["replay_rows"], run.get("micros_per_step")),
        loss_fn=lambda m, batch: sft_loss(m, batch, run["replay_weight"]),
        device=run["device"], checkpoint_path=run["out_dir"] / f"{name}_checkpoint.pt",
        eval_fn=evaluate if val else None,
        resume=resume, dist_info=run["dist"],
        checkpoint_meta={"config": model.config.to_dict(), "tokenizer_fingerprint": run["tokenizer_fingerprint"]},
        desc=name, plot_path=run["out_dir"] / f"{name}_loss.png")


def file_mb(path) -> float:
    """The file's size in MiB (2**20 bytes), as peak_memory_mb counts memory."""
    return round(pathlib.Path(path).stat().st_size / 2**20, 3)
