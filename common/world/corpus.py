"""Text in: the documents a tokenizer or a model is trained on.

Two sources, one shape (a list of document strings):
- a file the user passes: plain UTF-8 text, one document per blank-line-separated
  block, or JSONL with one {"text": ...} object per line (minimind's pretrain format);
- the default corpus, generated offline from the fictional world in world.py (beside this file).
Step 1 and step 3 both call `default_documents`, so the tokenizer is trained on
exactly the text the model is pretrained on.

    >>> train, heldout = default_documents(quick=True)
    >>> docs = read_documents("my_notes.txt")
"""

if __name__ == "__main__":  # run as a file: say what this is, before the imports below fail
    raise SystemExit("common/world/corpus.py is a module, not a script: "
                     "step1_tokenizer/train_tokenizer.py and step3_pretrain/data.py use it")

import json
import re
from pathlib import Path

from common.cli import UserError

HELDOUT_FRACTION = 0.02     # whole documents kept aside for validation
SKILL_SHARE = 0.3           # share of the default corpus that is skill text (skills.py)
QUIZ_SHARE = 0.1            # share of the default corpus that is quiz pages (world.quiz_documents)
                            # (the rest, 60 %, is the world's stories and entries)


def read_documents(path) -> list[str]:
    """Read a text or JSONL file into documents; bad input is a UserError naming file and line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text "
                        f"(byte {raw[err.start]:#04x} at offset {err.start})") from None
    if path.suffix == ".jsonl":
        docs = _jsonl_documents(path, text)
    else:
        docs = [block.strip() for block in re.split(r"\n\s*\n", text)]
    docs = [d for d in docs if d]
    if not docs:
        raise UserError(f"{path}: the file holds no text")
    return docs


def _jsonl_documents(path: Path, text: str) -> list[str]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f'{path}, line {number}: expected an object like {{"text": "..."}}')
        docs.append(record["text"])
    return docs


def split_heldout(docs: list[str], fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """Split by whole documents (every 1/fraction-th one is held out), so no document straddles both sides.
    A held-out document that is also a training document (generated text repeats its shortest
    documents) is dropped: a validation loss on text the model trained on would flatter it."""
    if len(docs) < 2:
        return docs, docs[:0]
    every = max(2, round(1 / fraction))
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    seen = set(train)
    heldout = [d for d in docs[every - 1::every] if d not in seen]
    return train, heldout


def default_documents(quick: bool = False, seed: int = 0) -> tuple[list[str], list[str]]:
    """The generated corpus as (train, held-out) documents: ~5 MB, or ~200 KB with quick."""
    return split_heldout(generated_documents(quick, seed))


def world_training_documents(quick: bool = False, seed: int = 0) -> list[str]:
    """The world documents (stories, entries and quiz pages: the ones that state facts) of
    default_documents' training split."""
    world_docs = set(_world_and_skill_documents(quick, seed)[0])
    return [d for d in default_documents(quick, seed)[0] if d in world_docs]


def generated_documents(quick: bool = False, seed: int = 0) -> list[str]:
    """World documents (stories, entries and quiz pages: the facts) and skill documents (copying,
    counting, sums) shuffled together."""
    import random

    world_docs, skill_docs = _world_and_skill_documents(quick, seed)
    docs = world_docs + skill_docs
    random.Random(seed).shuffle(docs)
    return docs


def _world_and_skill_documents(quick: bool, seed: int) -> tuple[list[str], list[str]]:
    from common.world.skills import skill_documents
    from common.world.world import CORPUS_BYTES, build_world, generate_documents, quiz_documents

    world = build_world(seed, "quick" if quick else "default")
    target = CORPUS_BYTES[world.size]
    return (generate_documents(world, target_bytes=round(target * (1 - SKILL_SHARE - QUIZ_SHARE)), seed=seed)
            + quiz_documents(world, target_bytes=round(target * QUIZ_SHARE), seed=seed),
            skill_documents(world, target_bytes=round(target * SKILL_SHARE), seed=seed))
