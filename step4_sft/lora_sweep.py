"""What LoRA's rank buys, and what each fine-tune forgets: a sweep beside full SFT.

    python step4_sft/lora_sweep.py            # r = 1..128 on wq,wv and on all-linear, + full SFT: hours on a CPU
    python step4_sft/lora_sweep.py --quick    # seconds: the same on the quick model, ranks 1 and 8
    python step4_sft/lora_sweep.py --ranks 4,16 --targets q_proj,v_proj --limit 25
    python step4_sft/lora_sweep.py --ranks 1,8 --targets all-linear@3e-3   # LAYERS@LR: its own learning rate

Each run starts from the same pretrained model and trains with step 4's recipe (sft.py's
setup and run_sft: LoRA as train_lora.py trains it, with its two token rows and no replay;
full SFT with and without replay). Then it is scored like eval_sft.py (exact match per task
on the held-out conversations) and on step 3's pretraining validation text: the loss there
after the fine-tune minus before is what the fine-tune FORGOT (Biderman et al. 2024, "LoRA
Learns Less and Forgets Less", measure the same trade).

Results go to out/step4/lora_sweep/results.json (a run already there with the same settings
is not trained again, so an interrupted sweep continues where it stopped), a summary to the
lora_sweep section of out/step4/metrics.json, and the figure to out/step4/lora_sweep.png:
accuracy per task against trainable parameters (log x), forgetting beside it. The summary and
the figure show every run in results.json made from the same base model, so sweeps run with
other ranks or targets add up into one picture.

All linear layers train at a lower learning rate than wq,wv (all-linear@3e-3), chosen by
measurement (EXPERIMENTS.md, "What rank buys").
"""
import argparse
import itertools
import json
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common.checkpoint import atomic_write_text
from common.cli import UserError, run_main
from common.metrics import write_metrics
from common.paths import step_dir
from common.plot import new_figure, save_figure
from common.seed import seed_everything
from step3_pretrain.data import load_tokens
from step3_pretrain.eval_ppl import evaluate_stream, token_byte_lengths
from step4_sft.eval_sft import evaluate, load_eval_records
from step2_model.inspect_model import count_trainable
from step4_sft.lora import apply_lora, merge_lora, parse_targets
from step4_sft.sft import LORA_PROFILES, PROFILES, add_sft_args, run_settings, run_sft, setup
from step4_sft.tasks import TASKS

RANKS = {"default": "1,2,4,8,16,32,64,128", "quick": "1,8"}
TARGET_SETS = ("wq,wv", "all-linear@3e-3")  # LAYERS[@learning rate]; without one, LoRA's default
PRETRAIN_TOKENS = {"default": 100_000, "quick": 20_000}  # as step 3's own validation


def planned_runs(args, ranks: list[int]) -> list[dict]:
    """Full SFT (the recipe, with replay, and without it), then LoRA at every rank on every target set."""
    runs = [dict(name="full_sft", kind="full SFT", replay=True), dict(name="full_sft_no_replay",
                                                                      kind="full SFT, no replay", replay=False)]
    for text in args.targets:
        layers, _, lr_text = text.partition("@")
        targets = parse_targets(layers)
        label = "all-linear" if layers.strip() == "all-linear" else ",".join(targets)
        lr = {}
        if "@" in text:
            try:
                lr = {"lr": float(lr_text)}
            except ValueError:
                lr = {"lr": 0.0}  # not a number: refused below, as a rate of 0 is
            if not 0 < lr["lr"] < float("inf"):
                raise UserError(f"--targets {text!r}: after @ comes a learning rate above 0, e.g. all-linear@3e-3")
        suffix = f"_lr{lr_text}" if lr_text else ""
        runs += [dict(name=f"lora_{label.replace(',', '-')}_r{r}{suffix}", kind=f"LoRA {label}" + (
            f", lr {lr_text}" if lr_text else ""), targets=list(targets), rank=r, replay=False, **lr) for r in ranks]
    return runs


def pretrain_loss(model, tokens, tokenizer, quick: bool) -> float:
    """Loss per token on step 3's validation text (consecutive windows, eval_ppl.py's scoring)."""
    device = next(model.parameters()).device
    return evaluate_stream(model, tokens, token_byte_lengths(tokenizer), model.config.block_size,
                           max_tokens=PRETRAIN_TOKENS["quick" if quick else "default"], device=device)["loss"]


def plan_settings(plan: dict, run: dict, args) -> dict:
    """The training settings of one planned run: its profile (LoRA's or full SFT's), the user's flags, and
    the run's own learning rate if its target set has one (LAYERS@LR)."""
    profiles = LORA_PROFILES if "rank" in plan else PROFILES
    return run_settings(argparse.Namespace(**{**vars(args), "lr": plan.get("lr", args.lr)}), run["device"],
                        profiles, len(run["examples"]), run["dist"].world_size)


def train_and_score(plan: dict, run: dict, args, base_state: dict, records, val_tokens, quick: bool) -> dict:
    """Fine-tune the base model as `plan` says, score it, and put the base weights back."""
    model, tokenizer = run["model"], run["tokenizer"]
    model.load_state_dict(base_state)
    seed_everything(args.seed)  # as each script starts: LoRA's A drawn as train_lora.py draws it
    lora = "rank" in plan
    settings = plan_settings(plan, run, args)
    this_run = {**run, "settings": settings, "replay_rows": run["replay_rows"] if plan["replay"] else 0}
    if lora:
        apply_lora(model, plan["targets"], plan["rank"], token_ids=[tokenizer.im_start_id, tokenizer.im_end_id])
    trainable, total = count_trainable(model)
    result = run_sft(model, this_run, args.seed, False, plan["name"], weight_decay=0.0 if lora else None)
    (run["out_dir"] / f"{plan['name']}_checkpoint.pt").unlink(missing_ok=True)  # the results below are kept
    if lora:
        merge_lora(model)  # the same model, answering at the base model's speed
    started = time.time()
    model.eval()
    accuracy, _ = evaluate(model, tokenizer, records, desc=plan["name"])
    forgot = pretrain_loss(model, val_tokens, tokenizer, quick)
    for p in model.parameters():
        p.requires_grad_(True)
    return {**plan, "trainable_params": trainable, "total_params": total, "steps": result["steps"],
            "profile": settings["profile"], "lr_used": settings["lr"], "limit": args.limit, "accuracy": accuracy,
            "pretrain_val_loss": round(forgot, 4),
            "assistant_val_loss": None if result["val_loss"] is None else round(result["val_loss"], 4),
            "train_seconds": result["train_seconds"], "eval_seconds": round(time.time() - started, 1)}


def plot_sweep(results: dict, base_loss: float, path) -> pathlib.Path:
    """Accuracy per task (and overall) against trainable parameters, log x; forgetting beside it."""
    panels = ["overall", *TASKS]
    fig, axes = new_figure(width=4 * (len(panels) + 1), height=3.6, ncols=len(panels) + 1)
    runs = list(results.values())
    def label(r):  # a LoRA run without a learning rate of its own trained at its profile's
        if "rank" not in r or "lr" in r:
            return r["kind"]
        return f"{r['kind']}, lr {r.get('lr_used', LORA_PROFILES.get(r['profile'], LORA_PROFILES['default'])['lr']):g}"
    lora_kinds = sorted({label(r) for r in runs if "rank" in r})
    for ax, key in zip(axes, panels + ["forgetting"]):
        def value(r):
            if key == "forgetting":
                return r["pretrain_val_loss"] - base_loss
            return 100 * r["accuracy"].get(key, 0)
        for kind, marker in zip(lora_kinds, itertools.cycle("os^vDPX")):
            points = sorted((r["trainable_params"], value(r), r["rank"]) for r in runs if label(r) == kind)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=kind)
            for x, y, rank in points:
                ax.annotate(f"{rank}", (x, y), fontsize=7, textcoords="offset points", xytext=(2, 3))
        for r, marker in zip([r for r in runs if "rank" not in r], "*P"):
            ax.plot([r["trainable_params"]], [value(r)], marker=marker, markersize=11, linestyle="", label=r["kind"])
        ax.set_xscale("log")
        ax.set(xlabel="trainable parameters (log)",
               ylabel="pretraining loss after - before (nats/token)" if key == "forgetting" else "exact match (%)",
               title="forgetting (step 3's validation text)" if key == "forgetting" else f"{key} accuracy")
        if key == "forgetting":
            ax.axhline(0, color="#888888", linewidth=0.8)
        else:
            ax.set_ylim(-3, 103)
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default=None,
                        help=f"LoRA ranks, comma-separated (default {RANKS['default']}; quick {RANKS['quick']})")
    parser.add_argument("--targets", nargs="+", default=list(TARGET_SETS), metavar="LAYERS",
                        help="target sets, each like --target_modules of train_lora.py, optionally with its own "
                             "learning rate after @ (default: wq,wv all-linear@3e-3)")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many conversations per task")
    parser.add_argument("--pretrain_data", default=None,
                        help="folder with step 3's val.bin, for forgetting (default out/step3)")
    add_sft_args(parser, PROFILES)
    args = parser.parse_args(argv)
    if args.resume:
        raise UserError("the sweep has no --resume: run it again, and the runs already in its results.json "
                        "are kept, not trained again")
    ranks_text = args.ranks or RANKS["quick" if args.quick else "default"]
    try:
        ranks = [int(r) for r in ranks_text.split(",")]
    except ValueError:
        raise UserError(f"--ranks {ranks_text!r}: write whole numbers separated by commas, e.g. 1,8,64") from None
    if min(ranks) < 1:
        raise UserError(f"--ranks {ranks_text!r}: every rank must be at least 1")
    plans = planned_runs(args, ranks)
    args.out = args.out or str(step_dir(4) / "lora_sweep")
    run = setup(args, PROFILES)
    model, tokenizer = run["model"], run["tokenizer"]
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    records = load_eval_records(args.eval_data or step_dir(4) / "sft_eval.jsonl", args.limit)
    val_tokens = load_tokens(args.pretrain_data or step_dir(3), "val", args.tokenizer)[0]
    base_loss = pretrain_loss(model, val_tokens, tokenizer, args.quick)
    results_path = run["out_dir"] / "results.json"
    saved = json.loads(results_path.read_text()) if results_path.exists() else {}
    results = {} if saved.get("base_pretrain_val_loss") != round(base_loss, 4) else saved["runs"]  # other base
    print(f"{len(plans)} runs; pretraining validation loss of the base model: {base_loss:.4f}")
    started = time.time()
    for plan in plans:
        done, settings = results.get(plan["name"]), plan_settings(plan, run, args)
        if done and all(done.get(k) == v for k, v in plan.items()) and done["steps"] == settings["max_steps"] and \
                done.get("limit") == args.limit and done.get("lr_used", settings["lr"]) == settings["lr"]:
            print(f"{plan['name']}: kept from {results_path}")
            continue
        results[plan["name"]] = result = train_and_score(plan, run, args, base_state, records, val_tokens, args.quick)
        atomic_write_text(results_path, json.dumps({"base_pretrain_val_loss": round(base_loss, 4), "runs": results},
                                                   indent=1))
        print(f"{plan['name']}: {result['trainable_params']:,} trainable, "
              + "  ".join(f"{task} {100 * acc:.1f}%" for task, acc in result["accuracy"].items())
              + f"  forgetting {result['pretrain_val_loss'] - base_loss:+.4f} nats/token "
                f"({result['train_seconds']:.0f} s training, {result['eval_seconds']:.0f} s scoring)")
    default_out = run["out_dir"].resolve() == (step_dir(4) / "lora_sweep").resolve()
    plot_dir = run["out_dir"].parent if default_out else run["out_dir"]  # out/step4/, or a sweep's own --out
    plot = plot_sweep(results, base_loss, plot_dir / "lora_sweep.png")
    summary = {name: {"trainable_params": r["trainable_params"], "overall": round(r["accuracy"]["overall"], 4),
                      "forgetting": round(r["pretrain_val_loss"] - base_loss, 4)} for name, r in results.items()}
    write_metrics(4, {"base_pretrain_val_loss": round(base_loss, 4), "runs": summary,  # every run of this base
                      "runs_seconds": round(sum(r["train_seconds"] + r["eval_seconds"] for r in results.values()), 1)},
                  section="lora_sweep", folder=None if default_out else run["out_dir"])
    print(f"wrote {results_path} and {plot} in {time.time() - started:.0f} s")
    return {"base_pretrain_val_loss": base_loss, "runs": results, "plot": plot}


if __name__ == "__main__":
    run_main(main)
