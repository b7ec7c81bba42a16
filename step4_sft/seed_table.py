"""How far do step 3's and step 4's figures move with the seed? Pretrain with several seeds,
fine-tune every base with several seeds, score every run, and tabulate mean, minimum and maximum.

    python step4_sft/seed_table.py                       # 3 pretraining x 2 fine-tuning seeds
    python step4_sft/seed_table.py --pretrain_seeds 0 --sft_seeds 0 1 2
    python step4_sft/seed_table.py --label sft1300 --sft_args "--max_steps 1300"   # another recipe
    python step4_sft/seed_table.py --label smear1200 --pretrain_args "--smear_keys --max_steps 1200"  # another base
    python step4_sft/seed_table.py --label lora8 --lora 8 --sft_seeds 0               # LoRA instead
    python step4_sft/seed_table.py --quick               # seconds: the same at --quick size

Why seeds: the same commands on another CPU give other floating-point sums, so two machines'
trainings drift apart the way two seeds' do. A figure that holds for one seed only will not
hold on the learner's laptop; the range over seeds is what a README can promise.

Each run is what the step READMEs run (train_pretrain.py --seed P, train_sft.py --seed S,
eval_sft.py), in folders of their own, so out/step3 and out/step4 stay as they are. Besides the
scores, every fine-tuning is followed by a probe of name copying (teacher-forced, at every
evaluation): does the model put the user's name after "Your name is"? It shows when during
fine-tuning a run learns to copy, or that it never does (step4_sft/EXPERIMENTS.md).

Runs already finished are read back, not repeated, so an interrupted table resumes where it
stopped. Writes, under out/seeds/LABEL/: one folder per run, seed_table.json (every run and the
summary), seed_table.md (the same as tables) and name_copying.png (the probe over the steps).
Pretrained bases are shared by every label, in out/seeds/pretrain_seedP/ (with --pretrain_args,
the label's own, in out/seeds/pretrain_seedP_LABEL/).
"""
import argparse
import json
import pathlib
import random
import re
import shlex
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from common.checkpoint import check_vocab
from common.cli import add_quick_arg, run_main
from common.paths import step_dir
from common.plot import new_figure, save_figure
from common.world.skills import new_name
from common.world.world import build_world
from step1_tokenizer.bpe import load_tokenizer_with_fingerprint
from step4_sft.chat_template import encode_prompt
from step4_sft.eval_sft import load_eval_records
from step4_sft.tasks import held_out_name, world_people

# What the table reports, per run: (key in the run's row, heading).
COLUMNS = [("pretrain_val_loss", "step 3 val loss"), ("pretrain_val_bpb", "step 3 bits/byte"),
           ("probe_facts", "step 3 facts completed"), ("probe_copying", "step 3 copies completed"),
           ("sft_val_loss", "SFT val loss"), ("facts", "facts"), ("instructions", "instructions"),
           ("multi_turn", "multi-turn"), ("math", "math"), ("overall", "overall"),
           ("names_said_back", "names said back"), ("numbers_said_back", "numbers said back")]
SHARES = {"probe_facts", "probe_copying", "facts", "instructions", "multi_turn", "math", "overall",
          "names_said_back", "numbers_said_back"}
ANSWER_LEAD = "Your name is"  # what every name-recall answer starts with (tasks.multi_turn_conversation)
PROBE_LABELS = {"held_out": "held-out world names", "training_users": "training users' names",
                "made_up": "made-up names"}


# ----------------------------------------------------------------------------- the name-copying probe

def name_probe_sets(eval_records: list[dict], world_names: list[str], user_names: list[str], n: int = 40,
                    seed: int = 0) -> dict:
    """Conversations that end by asking the user's name, three ways: the evaluation's own (users named
    from the world's held-out people, never a user in training), the same conversations with a name
    training gives users (`user_names`), and with a made-up name (which no training can have tied
    to anything). A model that copies gets all three; one that learnt its training users' names
    gets the second only."""
    asked = [r["conversations"] for r in eval_records
             if r.get("task") == "multi_turn" and r.get("kind") == "name"][:n]
    rng = random.Random(seed)
    sets = {"held_out": asked, "training_users": [], "made_up": []}
    for messages in asked:
        name = messages[-1]["content"].removeprefix(ANSWER_LEAD).strip(" .")
        for which, other in (("training_users", rng.choice(user_names)), ("made_up", new_name(rng, world_names))):
            sets[which].append([{**m, "content": re.sub(rf"\b{re.escape(name)}\b", other, m["content"])}
                                for m in messages])
    return sets


def name_positions(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, name_ids): the conversation up to and including "Your name is" in the last answer,
    then the name's tokens; the model should predict name_ids[i] at position len(ids) - 1 + i."""
    name = messages[-1]["content"].removeprefix(ANSWER_LEAD).strip(" .")
    prompt = encode_prompt(tokenizer, messages[:-1])
    lead = tokenizer.encode_ordinary(" " + ANSWER_LEAD)  # CONTENT_PREFIX, then the answer's first words
    full = tokenizer.encode_ordinary(f" {ANSWER_LEAD} {name}")
    assert full[:len(lead)] == lead, "the name must start a token of its own"
    return prompt + lead, full[len(lead):]


@torch.no_grad()
def name_copying(model, tokenizer, conversations: list[list[dict]]) -> dict:
    """Teacher-forced: the share of conversations whose name's first token is the model's top
    choice, and the mean loss (nats) over the name's tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits, losses = 0, []
    for messages in conversations:
        ids, name_ids = name_positions(tokenizer, messages)
        logits, _ = model(torch.tensor([ids + name_ids[:-1]], device=device))
        logits = logits[0, len(ids) - 1:].float()
        hits += int(logits[0].argmax()) == name_ids[0]
        losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(name_ids, device=device)).item())
    model.train(was_training)
    return {"first_token_right": hits / len(conversations), "name_loss": sum(losses) / len(losses)}


class NameProbe:
    """Called at every evaluation of a fine-tuning run; keeps what it measured, in order."""

    def __init__(self, tokenizer, sets: dict):
        self.tokenizer, self.sets, self.results = tokenizer, sets, []

    def __call__(self, model) -> None:
        found = {name: name_copying(model, self.tokenizer, conversations) for name, conversations in self.sets.items()}
        self.results.append(found)
        tqdm.write("name copying, first token right: " + ", ".join(
            f"{PROBE_LABELS[name]} {100 * f['first_token_right']:.0f} %" for name, f in found.items()))


def name_pools() -> tuple[list[str], list[str]]:
    """(every name in the world, the people training gives users): what tasks.make_datasets draws from."""
    world = build_world(0)
    return world.names(), [p for p in world_people(world) if not held_out_name(p)]


# ----------------------------------------------------------------------------- the runs

def shared_flags(args) -> list[str]:
    """The flags every script of the table is given as the table was."""
    return ((["--quick"] if args.quick else []) + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
            + (["--threads", str(args.threads)] if args.threads else []))


def pretrain(seed: int, args, root: pathlib.Path) -> dict:
    from step3_pretrain import train_pretrain
    # the default recipe's bases are shared by every label; another pretraining recipe's are its label's
    out = root / (f"pretrain_seed{seed}" + (f"_{args.label}" if args.pretrain_args else ""))
    row_path = out / "row.json"
    if not row_path.exists():
        result = train_pretrain.main(["--seed", str(seed), "--out", str(out)] + shared_flags(args)
                                     + shlex.split(args.pretrain_args))
        row = {k: result[k] for k in ("val_loss", "val_bpb", "train_seconds")}
        row_path.write_text(json.dumps(row, indent=1))
    row = json.loads(row_path.read_text())
    if "probe_facts" not in row:  # step 3's probe of what the base completes (probe_skills.py)
        from step3_pretrain import probe_skills
        found = probe_skills.main(["--checkpoint", str(out / "model.pt"), "--show", "0"] + shared_flags(args))
        row.update(probe_facts=found["facts"], probe_copying=found["copying"])
        row_path.write_text(json.dumps(row, indent=1))
    return {"model": out / "model.pt", **row}


def fine_tune(base: dict, seed: int, out: pathlib.Path, args, tokenizer, probe_sets: dict) -> dict:
    from step4_sft import eval_sft, train_lora, train_sft
    row_path = out / "row.json"
    if row_path.exists():
        return json.loads(row_path.read_text())
    common = shared_flags(args)
    probe = NameProbe(tokenizer, probe_sets)
    trainer, lora_flags = (train_lora, ["--lora_r", str(args.lora)]) if args.lora else (train_sft, [])
    trained = trainer.main(["--checkpoint", str(base["model"]), "--seed", str(seed), "--out", str(out),
                            "--eval_every", str(args.eval_every)] + common + lora_flags + shlex.split(args.sft_args),
                           probe=probe)
    tuned = (["--checkpoint", str(base["model"]), "--lora", str(out / "lora_adapter.pt")] if args.lora
             else ["--checkpoint", str(out / "sft_model.pt")])
    scored = eval_sft.main(tuned + ["--out", str(out)] + common)["lora" if args.lora else "full_sft"]
    kinds = scored["accuracy_by_kind"]
    row = {"sft_val_loss": trained["val_loss"], "sft_seconds": trained["train_seconds"],
           **scored["accuracy"], "names_said_back": kinds.get("multi_turn/name"),
           "numbers_said_back": kinds.get("multi_turn/number"),
           "name_copying": [{"step": step, **found} for step, found in
                            zip(trained["history"]["val_step"], probe.results)]}
    row_path.write_text(json.dumps(row, indent=1))
    return row


# ----------------------------------------------------------------------------- the table

def summarize(runs: list[dict]) -> dict:
    """Per column: mean, minimum and maximum over the runs that have it."""
    summary = {}
    for key, _ in COLUMNS:
        values = [run[key] for run in runs if run.get(key) is not None]
        if values:
            summary[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return summary


def _cell(key: str, value) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f} %" if key in SHARES else f"{value:.3f}"


def markdown(runs: list[dict], summary: dict, label: str, sft_args: str, pretrain_args: str = "") -> str:
    head = "| pretraining seed | fine-tuning seed | " + " | ".join(h for _, h in COLUMNS) + " |"
    rule = "| --- " * (len(COLUMNS) + 2) + "|"
    lines = [f"# Seed table: {label}", "", f"Pretraining options: `{pretrain_args or '(the defaults)'}`", "",
             f"Fine-tuning options: `{sft_args or '(the defaults)'}`", "", head, rule]
    for run in runs:
        lines.append(f"| {run['pretrain_seed']} | {run['sft_seed']} | "
                     + " | ".join(_cell(k, run.get(k)) for k, _ in COLUMNS) + " |")
    for stat in ("mean", "min", "max"):
        lines.append(f"| {stat} | | " + " | ".join(_cell(k, summary[k][stat]) if k in summary else "—"
                                                   for k, _ in COLUMNS) + " |")
    lines += ["", "Name copying (teacher-forced), first token right, held-out / made-up names, by step:", ""]
    for run in runs:
        curve = ", ".join(f"{p['step']}: {100 * p['held_out']['first_token_right']:.0f}/"
                          f"{100 * p['made_up']['first_token_right']:.0f}" for p in run["name_copying"])
        lines.append(f"- seeds {run['pretrain_seed']}/{run['sft_seed']}: {curve}")
    return "\n".join(lines) + "\n"


def plot_name_copying(runs: list[dict], path: pathlib.Path) -> pathlib.Path:
    fig, axes = new_figure(11, 4, ncols=2)
    for ax, which in zip(axes, ("held_out", "made_up")):
        for run in runs:
            points = run["name_copying"]
            ax.plot([p["step"] for p in points], [100 * p[which]["first_token_right"] for p in points], "o-",
                    label=f"seeds {run['pretrain_seed']}/{run['sft_seed']}")
        ax.set(title=f"{PROBE_LABELS[which]}: first token right", xlabel="fine-tuning step",
               ylabel="% of conversations", ylim=(-5, 105))
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def default_probe_sets() -> dict:
    """The probe's conversations, from the evaluation set data.py --create_sample wrote."""
    return name_probe_sets(load_eval_records(step_dir(4) / "sft_eval.jsonl"), *name_pools())


def probe_one(checkpoint, tokenizer, fingerprint: str) -> dict:
    from step4_sft.chat import load_chat_model
    model = load_chat_model(checkpoint, None, "cpu", tokenizer_fingerprint=fingerprint)
    check_vocab(model.config, tokenizer)
    probe_sets = default_probe_sets()
    found = {name: name_copying(model, tokenizer, conversations) for name, conversations in probe_sets.items()}
    print(f"{checkpoint}: {len(probe_sets['held_out'])} conversations that end with \"{ANSWER_LEAD}\", "
          f"teacher-forced, three ways:")
    for name, f in found.items():
        print(f"  {PROBE_LABELS[name]:<24} first token right {100 * f['first_token_right']:5.1f} %"
              f"   loss on the name {f['name_loss']:.2f} nats")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain_seeds", type=int, nargs="+", default=[0, 1, 2], metavar="P")
    parser.add_argument("--sft_seeds", type=int, nargs="+", default=[0, 1], metavar="S")
    parser.add_argument("--label", default="default", help="the recipe's name: its runs go to out/seeds/LABEL/")
    parser.add_argument("--lora", type=int, default=None, metavar="R",
                        help="fine-tune with LoRA of rank R (train_lora.py) instead of full SFT; give it its own --label")
    parser.add_argument("--sft_args", default="", help='more train_sft.py options, in quotes: "--max_steps 1300"')
    parser.add_argument("--pretrain_args", default="",
                        help='more train_pretrain.py options, in quotes: "--smear_keys --max_steps 1200" '
                             '(one option alone: --pretrain_args=--smear_keys); '
                             "its bases go to out/seeds/pretrain_seedP_LABEL/")
    parser.add_argument("--eval_every", type=int, default=None,
                        help="fine-tuning steps between evaluations and name probes (default 100; quick: 10)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--probe", default=None, metavar="CHECKPOINT",
                        help="train nothing: probe this fine-tuned model's name copying and print it")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for PyTorch (default: one per core; 1 with --quick)")
    add_quick_arg(parser)
    args = parser.parse_args(argv)
    args.eval_every = args.eval_every or (10 if args.quick else 100)
    root = step_dir(4).parent / "seeds"
    out = root / args.label
    tokenizer, fingerprint = load_tokenizer_with_fingerprint(args.tokenizer)
    if args.probe:
        return probe_one(args.probe, tokenizer, fingerprint)
    probe_sets = default_probe_sets()

    runs = []
    for p in args.pretrain_seeds:
        base = pretrain(p, args, root)
        for s in args.sft_seeds:
            row = fine_tune(base, s, out / f"pretrain{p}_sft{s}", args, tokenizer, probe_sets)
            runs.append({"pretrain_seed": p, "sft_seed": s, "pretrain_val_loss": base["val_loss"],
                         "pretrain_val_bpb": base["val_bpb"], "probe_facts": base["probe_facts"],
                         "probe_copying": base["probe_copying"], **row})
            summary = summarize(runs)  # rewritten after every run: a table to read while the rest train
            (out / "seed_table.json").write_text(json.dumps({"label": args.label, "sft_args": args.sft_args,
                                                             "pretrain_args": args.pretrain_args,
                                                             "runs": runs, "summary": summary}, indent=1))
            (out / "seed_table.md").write_text(markdown(runs, summary, args.label, args.sft_args,
                                                        args.pretrain_args))
            plot_name_copying(runs, out / "name_copying.png")
    print((out / "seed_table.md").read_text())
    print(f"wrote {out / 'seed_table.md'}, {out / 'seed_table.json'} and {out / 'name_copying.png'}")
    return {"runs": runs, "summary": summarize(runs), "out": out}


if __name__ == "__main__":
    run_main(main)
