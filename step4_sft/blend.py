"""A weighted blend of conversation sets: the idea of Megatron-LM's tools/retro/sft/open_inst.sh,
which trains on several instruction sets mixed by weight.

    python step4_sft/train_sft.py --data a.jsonl:0.7,b.jsonl:0.3      # 70 % of the conversations from a

    sources = parse_blend("out/step5/open_book_train.jsonl:0.5,out/step4/sft_train.jsonl:0.5")
    records = blend([(read_records(path), weight) for path, weight in sources], n=6000, seed=0)

Each source gives round(n * weight / total weight) items (source_counts): drawn without
replacement while it has enough, whole passes over it (each in a new order) when it has fewer.
The result is shuffled. A source may be in any format step 4's loader reads (data.to_ours).
Step 4's training scripts blend through here (their --data takes a blend), and so do step 5's
open-book fine-tune and Retro's instruction tuning.
"""

if __name__ == "__main__":  # run as a file: say what this is, before the imports below fail
    raise SystemExit("step4_sft/blend.py is a module, not a script: "
                     "step4_sft/train_sft.py --data a.jsonl:0.7,b.jsonl:0.3 uses it")

import pathlib
import random
import re

from common.cli import UserError
from step4_sft.data import SkipReport, read_conversations


def is_blend(spec: str) -> bool:
    """Does --data name a blend ("a.jsonl:0.7,b.jsonl:0.3", or one file with a weight) and not one file?"""
    return "," in spec or re.search(r":[0-9.]+$", spec) is not None


def parse_blend(spec: str) -> list[tuple[str, float]]:
    """"a.jsonl:0.7,b.jsonl:0.3" -> [("a.jsonl", 0.7), ("b.jsonl", 0.3)]; a missing weight is 1."""
    sources = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        path, _, weight = part.rpartition(":") if ":" in part else (part, "", "1")
        try:
            value = float(weight)
        except ValueError:
            raise UserError(f"--blend {spec!r}: weight {weight!r} of {path} is not a number "
                            f"(write path:weight, e.g. a.jsonl:0.7,b.jsonl:0.3)") from None
        if value < 0:
            raise UserError(f"--blend {spec!r}: weight {value} of {path} is negative")
        sources.append((path, value))
    if not sources or sum(w for _, w in sources) <= 0:
        raise UserError(f"--blend {spec!r}: no source with a positive weight")
    return sources


def read_records(path, strict: bool = False) -> list[dict]:
    """The conversation records of a JSONL file in our format, whatever format its lines are in;
    bad lines are skipped with a count, or stop the run when strict (step 4's loader)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"{path}: blend source not found")
    report = SkipReport(path, strict)
    records = [record for _, record in read_conversations(path, report)]
    summary = report.summary(len(records) + sum(report.counts.values()))
    if summary:
        print(summary)
    if not records:
        raise UserError(f"{path}: no usable conversation in the file")
    return records


def source_counts(weights: list[float], n: int) -> list[int]:
    """How many of the n items each source gives: its share of the weights."""
    total = sum(weights)
    return [round(n * weight / total) for weight in weights]


def blend(sources: list[tuple[list, float]], n: int, seed: int = 0) -> list:
    """n items (records or tokenized examples) drawn from the sources in proportion to their weights, shuffled."""
    rng = random.Random(seed)
    out = []
    for (records, _), want in zip(sources, source_counts([weight for _, weight in sources], n)):
        while want > 0:
            take = rng.sample(records, min(want, len(records)))
            out += take
            want -= len(take)
    rng.shuffle(out)
    return out


def blend_name(spec: str) -> str:
    """A folder name for a run on a blend: "blend_a_b" for a.jsonl:0.7,b.jsonl:0.3."""
    return "blend_" + "_".join(pathlib.Path(path).stem for path, _ in parse_blend(spec))


def load_blend(spec: str, load, seed: int = 0, verbose: bool = True) -> list:
    """Every source of the blend `spec` read by load(path) (a list: records or tokenized examples),
    blended into as many items as the sources hold together; says how many each source gave."""
    sources = [(load(path), weight) for path, weight in parse_blend(spec)]
    n = sum(len(items) for items, _ in sources)
    counts = source_counts([weight for _, weight in sources], n)
    if verbose:
        print(f"blend of {len(sources)} sources, {sum(counts):,} conversations: " + "; ".join(
            f"{path} gave {count:,} (weight {weight:g}; {len(items):,} in the file, "
            f"{count / len(items):.2f} passes)" for (path, weight), (items, _), count
            in zip(parse_blend(spec), sources, counts)))
    return blend(sources, n, seed)
