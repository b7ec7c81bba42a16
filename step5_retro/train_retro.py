"""Train a Retro model on re-drawn worlds, beside a plain model, and measure what its neighbours give it.

    python step5_retro/train_retro.py                   # --from_scratch: Retro and a plain twin, same tokens
    python step5_retro/train_retro.py --retrofit        # step 3's model frozen; only encoder and CCA train
    python step5_retro/train_retro.py --quick           # seconds: a smoke test

The text comes from many small worlds, each drawn afresh, each with a library of its own fact
sheets (retro_data.py): a name or a value in the text can only be predicted by reading a neighbour.
Validation uses worlds no training run saw, read three ways: with their retrieved neighbours, with
retrieval off (the decoder alone) and with random chunks of another world's library in their place.

Writes out/step5/retro_<mode>.pt (and plain_<mode>.pt for --from_scratch), retro_<mode>_loss.png
(Retro and plain together) and the "retro" section of out/step5/metrics.json.
"""
import argparse
import copy
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from common.checkpoint import check_vocab, checkpoint_dict, save_checkpoint
from common.cli import add_common_args, next_command, run_main, true_or_false
from common.device import pick_device
from common.metrics import write_metrics
from common.model import ModelConfig, Transformer
from common.paths import step_dir
from common.plot import new_figure, save_figure
from common.seed import seed_everything
from common.train import resolve_profile
from step1_tokenizer.bpe import load_tokenizer
from step2_model.inspect_model import count_trainable
from step5_retro.retro_data import TEXTS, TRAIN_SEED0, VAL_SEED0, retro_split
from step5_retro.retro_fit import NEIGHBOUR_MODES, fit, measure
from step5_retro.retro_model import RetroConfig, RetroModel, check_database, load_plain, retro_checkpoint

MODEL_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size")
RETRO_KEYS = ("chunk_size", "k", "cca_layers", "encoder_layers", "condition", "gate_init", "zero_output")
# Any flag given on the command line wins over its profile. The model keys apply to --from_scratch only
# (--retrofit takes its base's); the step counts are chosen to fit the 10-minute budget (README).
PROFILES = {
    "quick": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64, chunk_size=16, k=2,
                  cca_layers="1", encoder_layers=1, condition=False, gate_init=2.0, zero_output=False,
                  max_steps=30, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0, ckpt_every=0,
                  train_worlds=20, val_worlds=3, retrieval_dropout=0.3),
    "default": dict(n_layer=4, n_head=8, n_kv_head=4, n_embd=256, block_size=256, chunk_size=16, k=2,
                    cca_layers="1,3", encoder_layers=1, condition=False, gate_init=2.0, zero_output=False,
                    max_steps=600, batch_size=8, lr=2e-3, warmup_steps=30, eval_every=100, ckpt_every=100,
                    train_worlds=800, val_worlds=20, retrieval_dropout=0.3),
    "gpu": dict(n_layer=8, n_head=8, n_kv_head=4, n_embd=512, block_size=512, chunk_size=32, k=2,
                cca_layers="3,5,7", encoder_layers=2, condition=True, gate_init=2.0, zero_output=False,
                max_steps=3000, batch_size=32, lr=1e-3, warmup_steps=200, eval_every=500, ckpt_every=500,
                train_worlds=8000, val_worlds=50, retrieval_dropout=0.3),
}
# --retrofit trains only the encoder and CCA of a frozen base: its own defaults for what the user did
# not set. CCA's output projection at zero with the gate open, so it starts as exactly its base and
# learns at once; no retrieval dropout, since with retrieval off it is its base already. Its steps
# and worlds: half the profile's, as RETRO-fitting is meant to cost a fraction of training and its
# text is still read about once (EXPERIMENTS.md).
RETROFIT_DEFAULTS = dict(zero_output=True, retrieval_dropout=0.0)
RETROFIT_HALVED = ("max_steps", "train_worlds")
EVAL_ROWS = {"quick": 24, "default": 240, "gpu": 600}  # validation rows read for each figure


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--from_scratch", dest="mode", action="store_const", const="from_scratch",
                      help="train decoder, encoder and CCA together, and a plain twin on the same tokens (default)")
    mode.add_argument("--retrofit", dest="mode", action="store_const", const="retrofit",
                      help="RETRO-fit --base: its weights frozen, only the encoder and CCA train; it starts as "
                           "exactly its base: CCA's output projection at zero, the gate open (--zero_output true, "
                           "its default here), or the gate shut (--zero_output false --gate_init 0). Unless given, "
                           "--max_steps and --train_worlds are half the profile's and --retrieval_dropout is 0")
    parser.set_defaults(mode="from_scratch")
    parser.add_argument("--base", default=None, help="plain model to RETRO-fit (default out/step3/model.pt)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--out", default=None, help="output folder (default out/step5)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted Retro run exactly")
    parser.add_argument("--no_plain", action="store_true", help="--from_scratch without the plain twin")
    parser.add_argument("--text", choices=TEXTS, default=None,
                        help="fresh: re-drawn worlds (default from scratch); variants: world 0's entities with "
                             "re-drawn values (default for --retrofit: names the base can read, values it cannot know)")
    for key, value in PROFILES["default"].items():
        parser.add_argument(f"--{key}", type=true_or_false if isinstance(value, bool) else type(value), default=None,
                            help=f"default {value} (quick: {PROFILES['quick'][key]})")
    add_common_args(parser)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- training

def plot_runs(runs: dict, path, title: str):
    """Train loss (a moving average) and validation loss of each run, on one axis."""
    fig, ax = new_figure()
    for label, history in runs.items():
        loss = np.asarray(history["loss"])
        width = max(1, len(loss) // 25)
        smooth = np.convolve(loss, np.ones(width) / width, mode="valid")
        line, = ax.plot(history["step"][width - 1:], smooth, label=f"{label} (train)", linewidth=1)
        if history["val_step"]:
            ax.plot(history["val_step"], history["val_loss"], "o--", color=line.get_color(),
                    label=f"{label} (validation)")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.legend()
    return save_figure(fig, path)


def run_settings(args, device) -> dict:
    """The profile's settings, then the mode's own defaults, then every flag the user gave."""
    settings = resolve_profile(args, device, PROFILES)
    settings["cca_layers"] = [int(i) for i in str(settings["cca_layers"]).split(",") if i.strip()]
    if args.mode == "retrofit":
        settings.update({k: v for k, v in RETROFIT_DEFAULTS.items() if getattr(args, k) is None})
        settings.update({k: settings[k] // 2 for k in RETROFIT_HALVED if getattr(args, k) is None})
        if args.gate_init is None and not settings["zero_output"]:
            settings["gate_init"] = 0.0  # the gate shut
    return settings


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    seed_everything(args.seed)
    settings = run_settings(args, device)
    out_dir = pathlib.Path(args.out or step_dir(5))
    tokenizer = load_tokenizer(args.tokenizer)

    if args.mode == "retrofit":
        base_path = pathlib.Path(args.base or step_dir(3) / "model.pt")
        decoder = load_plain(base_path, device)
        plain = copy.deepcopy(decoder)  # the base itself is the plain model to beat
    else:
        config = ModelConfig(vocab_size=tokenizer.vocab_size, **{k: settings[k] for k in MODEL_KEYS})
        decoder = Transformer(config).to(device)
        plain = None if args.no_plain else copy.deepcopy(decoder)  # the same initial weights
    check_vocab(decoder.config, tokenizer)
    block_size = decoder.config.block_size
    retro = RetroConfig(**{k: settings[k] for k in RETRO_KEYS})
    model = RetroModel(decoder, retro)
    if args.mode == "retrofit":
        model.freeze_base()

    text = args.text or ("variants" if args.mode == "retrofit" else "fresh")
    data = dict(tokenizer=tokenizer, block_size=block_size, chunk_size=retro.chunk_size, k=retro.k, text=text,
                size="quick" if args.quick else "default")
    train_split = retro_split(range(TRAIN_SEED0, TRAIN_SEED0 + settings["train_worlds"]), **data)
    val = retro_split(range(VAL_SEED0, VAL_SEED0 + settings["val_worlds"]), **data)
    check_database(train_split.meta, val.meta, "validation neighbours")
    n_train, n_total = count_trainable(model)
    print(f"{args.mode} ({settings['profile']} profile on {device}): {len(train_split.rows):,} training rows "
          f"of {block_size} tokens from {settings['train_worlds']} worlds, {len(val.rows)} validation rows; "
          f"{n_train:,} of {n_total:,} parameters train")

    name = f"retro_{args.mode}"
    meta = {"config": decoder.config.to_dict(), "retro": retro.to_dict(), "database": train_split.meta}
    quick_look = EVAL_ROWS[settings["profile"]] // 4  # validation rows read during training
    result = fit(model, train_split, val, settings, args.seed, name, out_dir, device, args.resume, meta, quick_look)
    save_checkpoint(retro_checkpoint(model, train_split.meta), out_dir / f"{name}.pt")
    histories = {"Retro": result["history"]}
    plain_seconds = None
    if plain is not None and args.mode == "from_scratch":
        plain_result = fit(plain, train_split, val, settings, args.seed, f"plain_{args.mode}", out_dir, device,
                           meta={"config": plain.config.to_dict()}, eval_rows=quick_look)
        save_checkpoint(checkpoint_dict(plain), out_dir / f"plain_{args.mode}.pt")
        histories["plain"], plain_seconds = plain_result["history"], plain_result["train_seconds"]
    plot = plot_runs(histories, out_dir / f"{name}_loss.png", f"Retro ({args.mode}) and plain")

    rows = EVAL_ROWS[settings["profile"]]
    figures = {mode: measure(model, val, mode, rows) for mode in NEIGHBOUR_MODES}
    plain_figures = measure(plain, val, "off", rows) if plain is not None else None
    metrics = {"profile": settings["profile"], "settings": {k: settings[k] for k in sorted(settings) if k != "profile"},
               "device": str(device), "train_seconds": result["train_seconds"],
               "plain_train_seconds": plain_seconds, "steps": result["steps"], "trainable_params": n_train,
               "train_tokens": result["train_tokens"], "gates": [round(g, 4) for g in model.gates()],
               "retro": figures, "plain": plain_figures,
               "retro_val_ppl": figures["retrieved"]["ppl"], "retro_val_ppl_no_retrieval": figures["off"]["ppl"],
               "retro_val_ppl_random_neighbours": figures["random"]["ppl"]}
    if plain_figures is not None:
        metrics["gpt_val_ppl"] = plain_figures["ppl"]
        metrics["fact_ppl_drop"] = round(1 - figures["retrieved"]["fact_ppl"] / plain_figures["fact_ppl"], 4)
        metrics["no_retrieval_ppl_change"] = round(figures["off"]["ppl"] / plain_figures["ppl"] - 1, 4)
    write_metrics(5, {args.mode: metrics}, section="retro", folder=out_dir)
    print_report(metrics)
    print(f"saved {out_dir / (name + '.pt')}, loss curves in {plot}")
    if args.mode == "from_scratch":
        print(f"next: {next_command('python step5_retro/train_retro.py --retrofit')}")
    return {**result, **metrics, "model": model, "plain_model": plain, "val": val}


def print_report(metrics: dict) -> None:
    rows = [(f"Retro, {mode} neighbours" if mode != "off" else "Retro, retrieval off", metrics["retro"][mode])
            for mode in NEIGHBOUR_MODES]
    if metrics["plain"] is not None:
        rows.append(("plain model", metrics["plain"]))
    header = "validation worlds (never trained on)"
    print(f"{header:38s} {'ppl':>8s} {'fact ppl':>9s} {'fact acc':>9s} {'rest ppl':>9s}")
    for label, f in rows:
        print(f"{label:38s} {f['ppl']:8.3f} {f['fact_ppl']:9.3f} {f['fact_acc']:9.1%} {f['rest_ppl']:9.3f}")
    print(f"gates tanh(alpha): {metrics['gates']}")


if __name__ == "__main__":
    run_main(main)
