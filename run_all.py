"""Run the whole tutorial, step by step, and write out/report.md (the report card).

    python run_all.py --quick    # every step at its --quick size, into out/quick/: a minute
    python run_all.py            # the default profile: the results in the READMEs
    python run_all.py --from 3   # start at step 3 (earlier steps' outputs are reused)

Each command below is exactly what a step's README tells you to run, so this
script is also a map of the tutorial.
"""
import argparse
import json
import os
import platform
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
    (5, "Retrieval", [["step5_retro/build_db.py"],
                      ["step5_retro/sft_open_book.py"],
                      ["step5_retro/train_retro.py"],
                      ["step5_retro/sft_retro.py"],
                      ["step5_retro/eval_retrieval.py"]]),
    (6, "Multimodal", [["step6_multimodal/data.py", "--create_sample"],
                       ["step6_multimodal/train_vlm.py"]]),
]
# Scripts with nothing to place on a device take no --device (nor --threads).
WITHOUT_DEVICE_FLAG = {"step1_tokenizer/show_tokens.py"}


# The report card's headline figures: per step, (metric path in out/stepN/metrics.json, what it is, unit,
# one sentence). A path the file lacks is left out, so each step shows what its scripts wrote. Unit "share":
# a fraction, printed as a percentage.
HEADLINES = {
    1: [("vocab_size", "vocabulary", "token ids", "the 256 bytes, the merges learned and the special tokens"),
        ("bytes_per_token", "compression", "bytes/token", "UTF-8 bytes of held-out text per token: more is better"),
        ("encode_mb_per_s", "encoding speed", "MB/s", "how fast the trained tokenizer turns text into ids"),
        ("train_seconds", "training time", "s", "learning the merges")],
    2: [("params.total", "parameters", "", "of the model param_count.py builds, counted part by part"),
        ("params.formula_matches", "formula matches the count", "", "the closed-form count equals the real one"),
        ("kv_cache.speedup", "KV cache speed-up", "times", "greedy generation with the cache against without it"),
        ("kv_cache.same_tokens", "same tokens with and without the cache", "", "the cache changes speed, not text")],
    3: [("params", "parameters", "", "the model pretrained here"),
        ("train_seconds", "training time", "s", "the training loop, without data preparation and evaluation"),
        ("tokens_per_sec", "training speed", "tokens/s", "tokens read per second of training"),
        ("val_loss", "validation loss", "nats/token", "on documents never trained on; lower is better"),
        ("val_bpb", "bits per byte", "bits/byte", "the same loss per byte of text: 8 is knowing nothing"),
        ("probe.facts", "world facts completed", "share", "sentences about the world the model finishes right"),
        ("probe.sums", "sums completed", "share", "small additions written out in the corpus' own words")],
    4: [("base.accuracy.overall", "accuracy before fine-tuning", "share",
         "held-out questions the pretrained model answers exactly right"),
        ("full_sft.accuracy.overall", "accuracy after full SFT", "share", "every weight fine-tuned on conversations"),
        ("lora.accuracy.overall", "accuracy after LoRA", "share", "only the small LoRA matrices fine-tuned"),
        ("full_sft.train_seconds", "full SFT time", "s", "training every weight"),
        ("lora.train_seconds", "LoRA time", "s", "training the adapter"),
        ("lora.trainable_percent", "LoRA's trainable weights", "% of the model", "what LoRA trains")],
    5: [("retrieval_recall", "retrieval recall", "share", "questions whose answer is in the passages retrieved"),
        ("qa_em_closed_book", "answers without the database", "share", "exact-match answers from the weights alone"),
        ("qa_em_open_book_sft", "answers with the database", "share", "exact-match answers reading retrieved text"),
        ("edited_fact_success", "edited facts answered anew", "share",
         "facts rewritten in the database and answered with the new value, no retraining"),
        ("qa_em_retro", "Retro's answers, neighbours read by cross-attention", "share",
         "exact-match answers about worlds never trained on, from the instruction-tuned Retro model"),
        ("edited_fact_success_retro", "Retro's edited facts", "share",
         "facts rewritten in a world's library and answered by Retro with the new value")],
    6: [("vqa_acc.overall", "image questions answered", "share",
         "exact-match answers to questions about generated images")],
}


def shown(value) -> str:
    """A metric as the report card prints it: shares and losses to 4 digits, large numbers whole."""
    if isinstance(value, float) and value == value:  # not nan
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def figure(value, unit: str) -> str:
    """A headline figure with its unit: 0.8315 as a share is "83.2 %", 131392 is "131,392"."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if unit == "share":
        return f"{100 * value:.1f} %"
    number = f"{value:,}" if isinstance(value, int) else shown(value)
    return f"{number} {unit}".strip()


def lookup(metrics: dict, path: str):
    """metrics["a"]["b"] for "a.b"; None when a part is missing or the value is not a number (or a bool)."""
    for key in path.split("."):
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics if isinstance(metrics, (int, float)) else None  # bools are ints


def machine() -> str:
    """The CPU (model and cores) and the system this run used."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")  # Linux names the model only here
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{cpu or platform.machine()}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"


def step_section(step: int, title: str, seconds: float | None) -> list[str]:
    """One step of the report card: wall time, headline figures, plots inline, the raw metrics linked."""
    folder = paths.OUT_DIR / f"step{step}"
    metrics_path = folder / "metrics.json"
    lines = [f"## Step {step}: {title}", ""]
    if not metrics_path.exists():
        return lines + ["not run", ""]
    metrics = json.loads(metrics_path.read_text())
    timed = f"{seconds:.0f} s" if seconds is not None else "not timed (run before this run_all.py)"
    lines += [f"Wall time: {timed}. All figures: [step{step}/metrics.json](step{step}/metrics.json).", ""]
    rows = [(label, figure(value, unit), sentence) for path, label, unit, sentence in HEADLINES.get(step, [])
            if (value := lookup(metrics, path)) is not None]
    if rows:
        lines += ["| figure | value | what it says |", "|---|---|---|"]
        lines += [f"| {label} | {value} | {sentence} |" for label, value, sentence in rows]
        lines.append("")
    for plot in sorted(folder.glob("*.png")):
        lines += [f"![{plot.stem}](step{step}/{plot.name})", ""]
    return lines


def write_report(seconds: dict, quick: bool) -> Path:
    """out/report.md: per step the headline figures, the plots and the wall time; the raw figures linked."""
    lines = [f"# Quick run: every model here is {QUICK_MODEL_NOTE}" if quick else "# Report card", "",
             f"Profile: {'quick' if quick else 'default'}. Machine: {machine()}.", ""]
    if seconds:
        lines += [f"Wall time of this run: {sum(seconds.values()):.0f} s.", ""]
    for step, title, _ in STEPS:
        lines += step_section(step, title, seconds.get(step))
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
