"""Conversation data for supervised fine-tuning: read, check, tokenize, batch -- and look at the mask.

    python step4_sft/data.py --create_sample         # out/step4/sft_train.jsonl and sft_eval.jsonl
    python step4_sft/data.py --show_mask             # which tokens of a conversation carry loss
    python step4_sft/data.py --check my_data.jsonl   # load any file and report what would be skipped
    python step4_sft/data.py --convert chats.jsonl ours.jsonl   # any format below -> ours

The format is one conversation per line; ours is minimind's:

    {"conversations": [{"role": "system", "content": "..."},      <- optional, first only
                       {"role": "user", "content": "..."},
                       {"role": "assistant", "content": "..."}, ...], "task": "math"}   <- "task" optional

Each line may also be in OpenAI's format {"messages": [{"role", "content"}, ...]}, ShareGPT's
{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]} or Alpaca's
{"instruction", "input", "output"}; to_ours turns each into ours as it is read.

Bad lines (not JSON, in none of these formats, no assistant turn, an unknown role, empty content,
too long for the context) are skipped and counted, naming the file and line; with --strict the
first one stops the run. A conversation longer than the context keeps the turns that fit, cut
after the last assistant turn that fits; if not even the first answer fits, it is skipped.
"""
import argparse
import functools
import json
import math
import pathlib
import sys
from collections import Counter
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from common.checkpoint import atomic_write_text, load_checkpoint
from common.cli import UserError, add_common_args, next_command, run_main
from common.model import IGNORE_INDEX, ModelConfig
from common.paths import step_dir
from step1_tokenizer.bpe import load_tokenizer
from step3_pretrain.data import random_windows
from step3_pretrain.train_pretrain import PROFILES
from step4_sft.chat_template import conversation_problem, encode_conversation, shift_labels
from step4_sft.tasks import make_datasets

MAKE_SAMPLE = "python step4_sft/data.py --create_sample"
SHOW_MASK_EXAMPLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi, my name is Anna."},
    {"role": "assistant", "content": "Nice to meet you, Anna!"},
    {"role": "user", "content": "What is my name?"},
    {"role": "assistant", "content": "Your name is Anna."},
]


SKIP_KINDS = ("not valid JSON", "no known conversation format", "unknown role", "empty content", "no assistant turn",
              "longer than the context")  # how skipped lines are grouped in the summary


@dataclass
class Example:
    """One tokenized conversation: ids and loss mask (same length), where it came from."""
    ids: list[int]
    mask: list[int]
    task: str | None
    line: int


# ----------------------------------------------------------------------------- reading files

def write_jsonl(records: list[dict], path) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


FORMATS = ('{"conversations": [{"role", "content"}, ...]} (ours, minimind\'s), {"messages": [{"role", "content"}, '
           '...]} (OpenAI\'s), {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]} (ShareGPT\'s) '
           'or {"instruction", "input", "output"} (Alpaca\'s)')
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_ours(record) -> tuple[dict | None, str | None, str | None]:
    """(the record in our format, the name of the format it was in, None), or (None, None, what is wrong).

    Our format keeps every other key of the record ("task", "kind", ...); the messages are
    checked later, by chat_template.conversation_problem."""
    if not isinstance(record, dict):
        return None, None, f"no known conversation format: expected one of {FORMATS}"
    rest = {k: v for k, v in record.items() if k not in ("conversations", "messages", "instruction", "input",
                                                         "output")}
    turns = record.get("conversations")
    if isinstance(turns, list) and any(isinstance(m, dict) and "from" in m and "role" not in m for m in turns):
        messages = []
        for i, m in enumerate(turns):
            role = SHAREGPT_ROLES.get(m.get("from")) if isinstance(m, dict) else None
            if role is None:
                return None, None, (f"message {i} has unknown role {m.get('from') if isinstance(m, dict) else m!r} "
                                    f'(ShareGPT\'s "from" must be human, gpt or system)')
            messages.append({"role": role, "content": m.get("value")})
        return {**rest, "conversations": messages}, "sharegpt", None
    if turns is not None:
        return {**rest, "conversations": turns}, "ours", None
    if "messages" in record:
        return {**rest, "conversations": [_openai_message(m) for m in record["messages"]]
                if isinstance(record["messages"], list) else record["messages"]}, "openai", None
    if isinstance(record.get("instruction"), str) and "output" in record:
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        rest.pop("system", None)
        return {**rest, "conversations": system + [{"role": "user", "content": prompt},
                                                   {"role": "assistant", "content": record["output"]}]}, "alpaca", None
    return None, None, f"no known conversation format (keys {sorted(record)}): expected one of {FORMATS}"


def _openai_message(message):
    """OpenAI's message as ours: "developer" is its newer name for "system", and a content may be a list
    of parts, of which the text parts are kept."""
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict)
                          and part.get("type") == "text")
    role = "system" if message.get("role") == "developer" else message.get("role")
    return {"role": role, "content": content}


def record_problem(line: str) -> tuple[dict | None, str | None, str | None]:
    """Parse one JSONL line into a record in our format and the name of the format it came in,
    or say what is wrong with it: (record, format, None) or (None or record, format, problem)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, None, f"not valid JSON ({err.msg})"
    record, form, problem = to_ours(record)
    return record, form, problem or conversation_problem(record["conversations"])


class SkipReport:
    """Bad lines: with strict, the first is a UserError naming file and line; otherwise counted by kind."""

    def __init__(self, path, strict: bool):
        self.path, self.strict = path, strict
        self.counts, self.first_line = Counter(), {}

    def add(self, line: int, problem: str) -> None:
        if self.strict:
            raise UserError(f"{self.path}, line {line}: {problem}; fix it, or leave out --strict to skip such lines")
        kind = next((kind for kind in SKIP_KINDS if kind in problem), problem)
        self.counts[kind] += 1
        self.first_line.setdefault(kind, line)

    def summary(self, total: int) -> str | None:
        if not self.counts:
            return None
        kinds = "; ".join(f"{n} {kind} (first at line {self.first_line[kind]})" for kind, n in self.counts.items())
        return f"{self.path}: skipped {sum(self.counts.values())} of {total} conversations: {kinds}"


def read_conversations(path, report: SkipReport, formats: Counter | None = None):
    """Yield (line number, record in our format) for every usable line of a conversation file, in
    order, whatever format each line is in (FORMATS); bad lines go to `report` (which raises at once
    when strict). formats, if given, counts the usable lines by the format they came in."""
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"{path}: conversation file not found; run {next_command(MAKE_SAMPLE)} or pass --data FILE")
    with open(path, encoding="utf-8", errors="replace") as f:  # bad bytes become U+FFFD, never a crash
        for number, line in enumerate(f, start=1):
            if line.strip():
                record, form, problem = record_problem(line)
                if problem is None:
                    if formats is not None:
                        formats[form] += 1
                    yield number, record
                else:
                    report.add(number, problem)


def load_examples(path, tokenizer, max_tokens: int, strict: bool = False, verbose: bool = True) -> list[Example]:
    """Read a conversation file into tokenized Examples of at most max_tokens tokens.

    Every problem names the file and the line. strict: the first problem is a UserError;
    otherwise the line is skipped, and a summary says how many were skipped and why."""
    report = SkipReport(path, strict)
    examples, truncated = [], 0
    for number, record in read_conversations(path, report):
        ids, mask = encode_conversation(tokenizer, record["conversations"])
        if len(ids) > max_tokens:
            problem = f"longer than the context ({len(ids)} tokens, the limit is {max_tokens})"
            ids, mask = encode_conversation(tokenizer, record["conversations"], max_tokens)
            if strict or not ids:
                report.add(number, problem if ids else problem + "; not even its first answer fits")
                continue
            truncated += 1
        task = record.get("task") if isinstance(record.get("task"), str) else None
        examples.append(Example(ids, mask, task, number))
    summary = report.summary(len(examples) + sum(report.counts.values()))
    if verbose and summary:
        print(summary)
    if verbose and truncated:
        print(f"{path}: {truncated} conversations were longer than {max_tokens} tokens; "
              f"kept their turns up to the last whole answer that fits")
    if not examples:
        raise UserError(f"{path}: no usable conversation in the file{' (see above)' if summary else ''}; "
                        f"each line must be a conversation with an assistant turn, one of {FORMATS}")
    return examples


# ----------------------------------------------------------------------------- batches

def collate(examples: list[Example], pad_id: int) -> dict:
    """Pad to the longest example (padding has mask 0), then shift: {"idx", "targets"} of shape (B, T-1)."""
    longest = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
        mask[row, :len(e.mask)] = torch.tensor(e.mask)
    inputs, targets = shift_labels(ids, mask)
    return {"idx": inputs, "targets": targets}


def sft_batch(examples: list[Example], batch_size: int, pad_id: int, seed: int, step: int, micro: int,
              replay_tokens=None, replay_rows: int = 0, micros_per_step: int | None = None) -> dict:
    """Micro-batch `micro` of step `step`: a pure function of the arguments (like step 3's
    random_windows), so a resumed run sees exactly the same batches.

    By default each example is drawn at random (with replacement). With micros_per_step (the
    micro-batches of one optimizer step, over all processes) the examples come in epochs instead:
    each epoch is one pass over all of them in a shuffled order (epoch_indices).

    replay_rows > 0 appends that many windows of pretraining text (replay_tokens, a 1-D array of
    token ids), as long as the padded conversations and trained on every token. "replay"
    marks those rows, so the loss can weigh them apart (sft.sft_loss)."""
    if micros_per_step is None:
        indices = np.random.default_rng([seed, step, micro]).integers(0, len(examples), size=batch_size)
    else:
        indices = epoch_indices(len(examples), batch_size, seed, step, micro, micros_per_step)
    batch = collate([examples[i] for i in indices], pad_id)
    replay = torch.zeros(batch_size + replay_rows, dtype=torch.bool)
    if replay_rows:
        windows = random_windows(replay_tokens, batch["idx"].size(1), replay_rows, seed + 1, step, micro)
        batch = {key: torch.cat([batch[key], windows[key]]) for key in batch}
        replay[batch_size:] = True
    return {**batch, "replay": replay}


def epoch_indices(n: int, batch_size: int, seed: int, step: int, micro: int, micros_per_step: int) -> list[int]:
    """Which of n examples micro-batch `micro` of step `step` holds, when training goes in epochs.

    Lay every batch end to end: position p = (step * micros_per_step + micro) * batch_size + j.
    Position p belongs to epoch p // n and is example order[p % n] of that epoch's order, a
    permutation drawn from (seed, epoch). So each epoch shows every example exactly once, and a
    batch that crosses into the next epoch is filled from that epoch's order."""
    first = (step * micros_per_step + micro) * batch_size
    return [int(_epoch_order(n, seed, p // n)[p % n]) for p in range(first, first + batch_size)]


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, n]).permutation(n)


def steps_for_epochs(n: int, epochs: float, batch_size: int, micros_per_step: int) -> int:
    """Optimizer steps that show `epochs` passes over n examples (the last step is filled up from the next)."""
    return max(1, math.ceil(epochs * n / (batch_size * micros_per_step)))


# ----------------------------------------------------------------------------- looking at the mask

def mask_table(tokenizer, messages) -> str:
    """Token-by-token table: each position's token, its mask, and what it is trained to predict.

    'label' is the target after the shift: the NEXT token's id where that token has mask 1,
    else IGNORE_INDEX (-100, ignored). So the row that is trained to produce an answer's first token is the
    header's last token (the newline after 'assistant'), whose own mask is 0."""
    ids, mask = encode_conversation(tokenizer, messages)
    inputs, targets = shift_labels(torch.tensor(ids), torch.tensor(mask))
    rows = [f"{'pos':>4}  {'token':<18} {'id':>6}  {'mask':>4}  {'label':>6}  {'shifted mask':>12}"]
    for pos, token_id in enumerate(ids):
        label = int(targets[pos]) if pos < len(targets) else None
        shifted = "" if label is None else str(int(label != IGNORE_INDEX))
        token = repr(tokenizer.token_bytes(token_id).decode("utf-8", errors="backslashreplace"))
        rows.append(f"{pos:>4}  {token:<18} {token_id:>6}  {mask[pos]:>4}  {'' if label is None else label:>6}  "
                    f"{shifted:>12}")
    trained = sum(mask)
    rows.append(f"{len(ids)} tokens, {trained} with mask 1 (the assistant answers and their <|im_end|>): "
                f"the loss averages over {trained} positions")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- command line

def training_context(checkpoint, block_size: int | None, quick: bool) -> tuple[int, str]:
    """The context length training would use, and where it comes from: --block_size, else the block size
    of the model training starts from, else (no model yet) step 3's profile's."""
    if block_size:
        return block_size, "--block_size"
    path = pathlib.Path(checkpoint or step_dir(3) / "model.pt")
    if checkpoint or path.exists():  # a --checkpoint that is not there is an error, not a fallback
        config = ModelConfig.from_dict(load_checkpoint(path).get("config"), str(path))
        return config.block_size, f"the block size of {path}, as training uses it"
    profile = "quick" if quick else "default"
    return PROFILES[profile]["block_size"], f"step 3's {profile} profile: there is no model at {path} yet"


def convert(source, target, strict: bool = False) -> dict:
    """Write every usable conversation of `source`, whatever its format, to `target` in ours
    (the idea of Megatron-LM's dataset_conv.py). Returns {"converted": n, "formats": {name: n}}."""
    report, formats = SkipReport(source, strict), Counter()
    records = [record for _, record in read_conversations(source, report, formats)]
    summary = report.summary(len(records) + sum(report.counts.values()))
    if summary:
        print(summary)
    if not records:
        raise UserError(f"{source}: no usable conversation to convert; each line must be one of {FORMATS}")
    write_jsonl(records, target)
    print(f"wrote {target}: {len(records)} conversations in our format "
          f"(read as {', '.join(f'{n} {name}' for name, n in formats.items())})")
    return {"converted": len(records), "formats": dict(formats)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--create_sample", action="store_true",
                        help="generate the training and evaluation sets from the fictional world")
    parser.add_argument("--show_mask", action="store_true", help="print the loss-mask table of a sample conversation")
    parser.add_argument("--check", default=None, metavar="FILE",
                        help="load a conversation file as training would, and report what it skips")
    parser.add_argument("--convert", nargs=2, default=None, metavar=("IN", "OUT"),
                        help="write the conversations of IN (any format the loader reads) to OUT in ours")
    parser.add_argument("--strict", action="store_true", help="with --check or --convert: stop at the first bad line")
    parser.add_argument("--checkpoint", default=None,
                        help="with --check: the pretrained model training starts from (default out/step3/model.pt); "
                             "its context length is the limit, as in training")
    parser.add_argument("--block_size", type=int, default=None,
                        help="with --check: this context length instead of the --checkpoint's")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--out", default=None, help="folder for sft_train.jsonl / sft_eval.jsonl (default out/step4)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if not (args.create_sample or args.show_mask or args.check or args.convert):
        parser.error("choose --create_sample, --show_mask, --check FILE or --convert IN OUT")
    result = {}
    if args.create_sample:
        out_dir = pathlib.Path(args.out or step_dir(4))
        train, evaluation = make_datasets(args.seed, args.quick)
        write_jsonl(train, out_dir / "sft_train.jsonl")
        write_jsonl(evaluation, out_dir / "sft_eval.jsonl")
        for name, records in (("sft_train.jsonl", train), ("sft_eval.jsonl", evaluation)):
            counts = Counter(r["task"] for r in records)
            print(f"wrote {out_dir / name}: {len(records)} conversations "
                  f"({', '.join(f'{n} {task}' for task, n in counts.items())})")
        result.update(train=len(train), eval=len(evaluation))
    if args.convert:
        result.update(convert(*args.convert, strict=args.strict))
    if args.show_mask or args.check:
        tokenizer = load_tokenizer(args.tokenizer)
    if args.show_mask:
        print(mask_table(tokenizer, SHOW_MASK_EXAMPLE))
    if args.check:
        block_size, source = training_context(args.checkpoint, args.block_size, args.quick)
        print(f"context: {block_size} tokens ({source})")
        examples = load_examples(args.check, tokenizer, block_size + 1, strict=args.strict)
        n_tokens = sum(len(e.ids) for e in examples)
        print(f"{args.check}: {len(examples)} usable conversations, {n_tokens:,} tokens, "
              f"{sum(sum(e.mask) for e in examples):,} of them trained (mask 1)")
        result.update(examples=len(examples), tokens=n_tokens)
    return result


if __name__ == "__main__":
    run_main(main)
