"""Run the whole tutorial, step by step, and write out/report.md (the report card).

    python run_all.py --quick    # every step at its --quick size, into out/quick/: a minute
    python run_all.py            # the default profile: the results in the READMEs
    python run_all.py --from 3   # start at step 3 (earlier steps' outputs are reused)

Each command below is exactly what a step's README tells you to run, so this
script is also a map of the tutorial.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import paths
from common.cli import QUICK_MODEL_NOTE, add_quick_arg, next_command

REPO_ROOT = paths.REPO_ROOT

# (step, title, commands); each command is a script path and its arguments.
STEPS = [
    (1, "Tokenizer", [["step1_tokenizer/train_tokenizer.py"],
                      ["step1_tokenizer/show_tokens.py"]]),
    (2, "The model", [["step2_model/param_count.py"],
                      ["step2_model/causality_check.py"],
                      ["step2_model/kv_cache_bench.py"]]),
    (3, "Pretraining", [["step3_pretrain/data.py"],
                        ["step3_pretrain/train_pretrain.py"],
                        ["step3_pretrain/eval_ppl.py"],
                        ["step3_pretrain/probe_skills.py"],
                        ["step2_model/attention_map.py"]]),
    (4, "Fine-tuning", [["step4_sft/data.py", "--create_sample"],
                        ["step4_sft/train_sft.py"],
                        ["step4_sft/train_lora.py", "--lora_r", "8"],
                        ["step4_sft/eval_sft.py"]]),
]
# Scripts with nothing to place on a device take no --device (nor --threads).
WITHOUT_DEVICE_FLAG = {"step1_tokenizer/show_tokens.py"}


def flatten(metrics: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows += flatten(value, f"{prefix}{key}.")
        elif not isinstance(value, list):
            rows.append((prefix + key, value))
    return rows


def shown(value) -> str:
    """A metric as the report card prints it: shares and losses to 4 digits, large numbers whole."""
    if isinstance(value, float) and value == value:  # not nan
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_report(seconds: dict, quick: bool) -> Path:
    lines = ["# Report card", "", f"Profile: {'quick' if quick else 'default'}.", ""]
    if quick:
        lines = [f"# Quick run: every model here is {QUICK_MODEL_NOTE}", "", *lines]
    for step, title, _ in STEPS:
        lines += [f"## Step {step}: {title}", ""]
        if step in seconds:
            lines += [f"Ran in {seconds[step]:.0f} s.", ""]
        path = paths.OUT_DIR / f"step{step}" / "metrics.json"
        if path.exists():
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {key} | {shown(value)} |" for key, value in flatten(json.loads(path.read_text()))]
        else:
            lines.append("(no metrics.json)")
        lines.append("")
    report = paths.OUT_DIR / "report.md"
    paths.OUT_DIR.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_quick_arg(parser, help="tiny sizes, the whole tutorial in a minute; everything goes to out/quick/, "
                               "so a full run's models and figures in out/ are left as they are")
    parser.add_argument("--from", dest="start", type=int, default=1, help="first step to run")
    parser.add_argument("--device", default="auto", help="passed to every script")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="passed to every script (default: each script's own choice, common/device.py)")
    args = parser.parse_args(argv)
    seconds = {}
    for step, title, commands in STEPS:
        if step < args.start:
            continue
        print(f"\n=== Step {step}: {title} ===", flush=True)
        started = time.time()
        for script, *script_args in commands:
            cmd = [sys.executable, script, *script_args]
            if script not in WITHOUT_DEVICE_FLAG:
                cmd += ["--device", args.device]
                cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--quick"] if args.quick else []
            print("$ " + " ".join(["python", *cmd[1:]]), flush=True)
            if subprocess.run(cmd, cwd=REPO_ROOT).returncode != 0:
                print(f"run_all: step {step} failed at `{' '.join(cmd[1:])}`; fix it, then "
                      f"`{next_command(f'python run_all.py --from {step}')}`", file=sys.stderr)
                return 1
        seconds[step] = time.time() - started
    report = write_report(seconds, args.quick)
    print(f"\nreport card: {report.relative_to(REPO_ROOT) if report.is_relative_to(REPO_ROOT) else report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
