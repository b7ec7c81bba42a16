"""Score models on the held-out conversations: exact-match accuracy per task.

    python step4_sft/eval_sft.py                                   # every model that exists: base, full SFT, LoRA
    python step4_sft/eval_sft.py --base                            # only the pretrained model (out/step3/model.pt)
    python step4_sft/eval_sft.py --checkpoint out/step4/sft_model.pt
    python step4_sft/eval_sft.py --lora out/step4/lora_adapter.pt

For each held-out conversation the model reads everything up to the last
assistant turn and writes that turn itself (greedy decoding); the reply is
scored by exact match (math: the number after "####"; see tasks.score).
Results go to out/step4/metrics.json (sections base, full_sft, lora; with each
layer's attention entropy over the prompts, step4_sft/EXPERIMENTS.md), the
replies to out/step4/eval_<section>.jsonl, and once full SFT and LoRA are both
scored, a comparison plot to out/step4/sft_vs_lora.png.
"""
import argparse
import pathlib
import sys
import time
from collections import defaultdict

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from common.checkpoint import check_vocab
from common.cli import UserError, add_common_args, next_command, run_main
from common.device import pick_device
from common.metrics import write_metrics
from common.paths import step_dir
from common.plot import new_figure, save_figure
from step1_tokenizer.bpe import load_tokenizer_with_fingerprint
from step2_model.inspect_model import attention_entropy
from step4_sft.chat import load_chat_model, reply
from step4_sft.chat_template import CONTENT_PREFIX, encode_prompt
from step4_sft.data import SkipReport, read_conversations, write_jsonl
from step4_sft.sft import file_mb
from step4_sft.tasks import TASKS, score

SECTIONS = ("base", "full_sft", "lora")
EXTRA_TOKENS = 16  # a reply this much longer than the expected one is wrong anyway: stop generating


def evaluate(model, tokenizer, records: list[dict], desc: str = "eval") -> tuple[dict, list[dict]]:
    """Accuracy per task (and "overall") over records ending in an assistant turn, and every reply."""
    replies = []
    for record in tqdm(records, desc=desc, leave=False):
        *prompt, expected = record["conversations"]
        task = record.get("task") or "other"
        budget = len(tokenizer.encode_ordinary(CONTENT_PREFIX + expected["content"])) + EXTRA_TOKENS
        answer = reply(model, tokenizer, prompt, max_new_tokens=budget)
        replies.append({"task": task, "kind": record.get("kind"), "correct": score(task, answer, expected["content"]),
                        "expected": expected["content"], "reply": answer})
    accuracy = accuracy_by(replies, "task")
    # Unrounded: a share rounded here and rounded again when printed can come out one digit off.
    accuracy["overall"] = sum(r["correct"] for r in replies) / max(1, len(replies))
    return accuracy, replies


def prompt_attention_entropy(model, tokenizer, records: list[dict]) -> list[float]:
    """Per layer, the mean attention entropy (nats) while reading the evaluation prompts: a
    fine-tuning that drives it towards 0 has collapsed attention (step4_sft/EXPERIMENTS.md)."""
    device, window = next(model.parameters()).device, model.config.block_size
    per_record = [attention_entropy(model, torch.tensor([encode_prompt(tokenizer, r["conversations"][:-1])[-window:]],
                                                        device=device)) for r in records]
    return [round(sum(layer) / len(per_record), 3) for layer in zip(*per_record)]


def accuracy_by(replies: list[dict], key: str) -> dict:
    """Accuracy per task, or per task/kind (records without a "kind" are left out of that one)."""
    groups = defaultdict(list)
    for r in replies:
        if r[key] is not None:
            groups[r[key] if key == "task" else f"{r['task']}/{r[key]}"].append(r["correct"])
    return {name: sum(oks) / len(oks) for name, oks in groups.items()}


def load_eval_records(path, limit: int | None = None) -> list[dict]:
    """The held-out conversations that end with an assistant turn, at most `limit` per task."""
    records, per_task = [], defaultdict(int)
    for _, record in read_conversations(path, SkipReport(path, strict=True)):
        task = record.get("task") or "other"
        if record["conversations"][-1]["role"] != "assistant" or (limit and per_task[task] >= limit):
            continue
        per_task[task] += 1
        records.append(record)
    if not records:
        raise UserError(f"{path}: no conversation ends with an assistant turn to score")
    return records


def plot_comparison(metrics: dict, path) -> pathlib.Path:
    """Full SFT vs LoRA: accuracy per task (base too), trainable parameters, file size, training time."""
    sections = [s for s in SECTIONS if "accuracy" in metrics.get(s, {})]
    colors = {"base": "#bbbbbb", "full_sft": "#4c72b0", "lora": "#dd8452"}
    fig, axes = new_figure(width=15, height=3.8, ncols=4)
    tasks = [t for t in TASKS + ("overall",) if any(t in metrics[s]["accuracy"] for s in sections)]
    width = 0.8 / len(sections)
    for i, s in enumerate(sections):
        axes[0].bar([x + i * width for x in range(len(tasks))],
                    [100 * metrics[s]["accuracy"].get(t, 0) for t in tasks], width, label=s, color=colors[s])
    axes[0].set_xticks([x + width * (len(sections) - 1) / 2 for x in range(len(tasks))], tasks, rotation=20)
    axes[0].set(ylabel="exact match (%)", ylim=(0, 105), title="held-out accuracy")
    axes[0].legend(fontsize=8)
    tuned = [s for s in ("full_sft", "lora") if s in sections]
    for ax, key, label, log in ((axes[1], "trainable_params", "trainable parameters", True),
                                (axes[2], "file_mb", "file size (MB)", True),
                                (axes[3], "train_seconds", "training time (s)", False)):
        values = [metrics[s].get(key) or 0 for s in tuned]
        ax.bar(tuned, values, color=[colors[s] for s in tuned])
        for x, v in enumerate(values):
            ax.annotate(f"{v:,.3g}", (x, v), ha="center", va="bottom", fontsize=8)
        ax.set(title=label, yscale="log" if log and all(values) else "linear")
    return save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a model file to score (section full_sft)")
    parser.add_argument("--lora", default=None, metavar="ADAPTER",
                        help="score the base --checkpoint (default out/step3/model.pt) with this adapter "
                             "(section lora)")
    parser.add_argument("--base", action="store_true",
                        help="score the pretrained model out/step3/model.pt (section base)")
    parser.add_argument("--data", default=None,
                        help="held-out conversations (default out/step4/sft_eval.jsonl)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--out", default=None, help="folder for replies and plot (default out/step4)")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many conversations per task")
    add_common_args(parser)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    out_dir = pathlib.Path(args.out or step_dir(4))
    base_path = step_dir(3) / "model.pt"
    if args.lora:
        runs = {"lora": dict(checkpoint=args.checkpoint or base_path, lora=args.lora)}
    elif args.checkpoint:
        runs = {"full_sft": dict(checkpoint=args.checkpoint)}
    elif args.base:
        runs = {"base": dict(checkpoint=base_path)}
    else:  # everything that exists
        candidates = {"base": dict(checkpoint=base_path),
                      "full_sft": dict(checkpoint=out_dir / "sft_model.pt"),
                      "lora": dict(checkpoint=base_path, lora=out_dir / "lora_adapter.pt")}
        runs = {s: r for s, r in candidates.items() if pathlib.Path(r.get("lora") or r["checkpoint"]).exists()}
        if not runs:
            raise UserError(f"no model to score in {out_dir} or {base_path}; "
                            f"run {next_command('python step4_sft/train_sft.py')}")
    records = load_eval_records(args.data or step_dir(4) / "sft_eval.jsonl", args.limit)
    tokenizer, fingerprint = load_tokenizer_with_fingerprint(args.tokenizer)
    results, metrics = {}, {}
    for section, source in runs.items():
        model = load_chat_model(source["checkpoint"], source.get("lora"), device, tokenizer_fingerprint=fingerprint)
        check_vocab(model.config, tokenizer)
        started = time.time()
        accuracy, replies = evaluate(model, tokenizer, records, desc=section)
        write_jsonl(replies, out_dir / f"eval_{section}.jsonl")
        data = {"accuracy": accuracy, "accuracy_by_kind": accuracy_by(replies, "kind"), "n_items": len(records),
                "eval_seconds": round(time.time() - started, 1),
                "attention_entropy": prompt_attention_entropy(model, tokenizer, records)}
        if section == "base":  # no fine-tuning: nothing trained, the file is the step-3 model
            data.update(trainable_params=0, train_seconds=0.0, peak_memory_mb=None,
                        file_mb=file_mb(source["checkpoint"]))
        results[section] = data
        # out/step4/metrics.json, or the --out folder's own: a scratch run leaves the step's report alone
        metrics = write_metrics(4, data, section=section, folder=out_dir)
        print(f"{section:>9}: " + "  ".join(f"{task} {100 * acc:.1f}%" for task, acc in accuracy.items()))
        print(f"{'':>9}  attention entropy per layer (nats): {data['attention_entropy']}")
    if all("accuracy" in metrics.get(s, {}) for s in ("full_sft", "lora")):
        plot = plot_comparison(metrics, out_dir / "sft_vs_lora.png")
        print(f"wrote {plot}")
    return results


if __name__ == "__main__":
    run_main(main)
