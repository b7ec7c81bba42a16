"""A weighted blend of conversation sets: the idea of Megatron-LM's tools/retro/sft/open_inst.sh,
which trains on several instruction sets mixed by weight.

    sources = parse_blend("out/step5/open_book_train.jsonl:0.5,out/step4/sft_train.jsonl:0.5")
    records = blend([(read_records(path), weight) for path, weight in sources], n=6000, seed=0)

Each source gives round(n * weight / total weight) records: drawn without replacement while it has
enough, whole passes over it (each in a new order) when it has fewer. The result is shuffled.
Step 5's open-book fine-tune and Retro's instruction tuning (part 2) both blend through here.
"""
import json
import pathlib
import random

from common.cli import UserError


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


def read_records(path) -> list[dict]:
    """The conversation records of a JSONL file (checked later, line by line, by step 4's loader)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"{path}: blend source not found")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
    if not records:
        raise UserError(f"{path}: no conversations in the file")
    return records


def blend(sources: list[tuple[list[dict], float]], n: int, seed: int = 0) -> list[dict]:
    """n records drawn from the sources in proportion to their weights, shuffled."""
    rng = random.Random(seed)
    total = sum(weight for _, weight in sources)
    out = []
    for records, weight in sources:
        want = round(n * weight / total)
        while want > 0:
            take = rng.sample(records, min(want, len(records)))
            out += take
            want -= len(take)
    rng.shuffle(out)
    return out
