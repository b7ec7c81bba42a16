"""Conversations about images: generated ones for training and evaluation, or your own JSONL file.

    python step6_multimodal/data.py --create_sample          # out/step6/samples.png + samples.jsonl (+ PNGs)
    python step6_multimodal/data.py --check my_images.jsonl  # load a file as training would; report skips

The format is step 4's with an "image" path beside "conversations" (minimind-v's and LLaVA's):

    {"image": "pics/cat.png", "conversations": [{"role": "user", "content": "<image>\\nWhat colour is it?"},
                                                {"role": "assistant", "content": "red"}]}

A relative path is read from the JSONL file's folder. "image" may also be a list, one path per
<image> tag, in order. In a user turn, each "<image>" becomes N_IMAGE_TOKENS placeholder positions
(the tokenizer's <image> special token, repeated); the model overwrites their embeddings with
what it sees (vision.py). Bad lines -- as in step 4, plus a missing or unreadable image, <image>
tags that do not match the images -- are skipped and counted, or refused with --strict.

Generated conversations: each asks one kind of question (QUESTION_KINDS) about a fresh random
scene (images.py); one kind is a follow-up that refers back to the turn before.
"""
import argparse
import pathlib
import sys
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from common.cli import UserError, add_common_args, run_main
from common.paths import step_dir
from step1_tokenizer.bpe import IMAGE, load_tokenizer
from step4_sft.chat_template import CONTENT_PREFIX, encode_header, encode_turn
from step4_sft.data import SkipReport, collate, read_conversations, write_jsonl
from step6_multimodal.images import (COLOURS, IMAGE_SIZE, KINDS, MAX_SHAPES, draw, load_image, random_scene,
                                     save_png, to_tensor)
from step6_multimodal.vision import VisionConfig

N_IMAGE_TOKENS = VisionConfig().n_image_tokens  # placeholders per <image>: what the default encoder produces
# kind -> (fewest, most) shapes in its scenes; "caption" is stage 1's, the rest stage 2's
SCENE_SIZES = {"caption": (0, MAX_SHAPES), "colour": (1, MAX_SHAPES), "shape": (1, MAX_SHAPES),
               "exists": (1, MAX_SHAPES), "count": (0, MAX_SHAPES), "left_right": (2, MAX_SHAPES),
               "above_below": (2, MAX_SHAPES), "follow_up": (1, MAX_SHAPES)}
QUESTION_KINDS = tuple(k for k in SCENE_SIZES if k != "caption")
# How often each kind is drawn in stage 2: shape and existence, learnt slowest, twice as often
# (EXPERIMENTS.md, section 9). No captions: a caption's twenty-odd answer tokens would take half
# of a batch's loss from the one-word answers.
STAGE2_MIX = {"colour": 1, "shape": 2, "exists": 2, "count": 1, "left_right": 1,
              "above_below": 1, "follow_up": 1}


@dataclass
class ImageExample:
    """One tokenized conversation with its images: ids and loss mask (same length), images (n, 3, H, W)."""
    ids: list[int]
    mask: list[int]
    images: torch.Tensor
    kind: str | None = None
    line: int = 0


# ----------------------------------------------------------------------------- generated conversations

def caption(scene) -> str:
    """The shapes from left to right: "a red circle, a blue square and a white triangle"."""
    names = [f"a {s.name}" for s in sorted(scene, key=lambda s: s.centre[0])]
    if not names:
        return "nothing"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _ask(question: str) -> dict:
    """The question, then the picture: so the picture's positions can attend to the question (see README)."""
    return {"role": "user", "content": f"{question}\n{IMAGE}"}


def _answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


def conversation_about(scene, kind: str, rng: np.random.Generator) -> list[dict] | None:
    """A conversation of kind `kind` about `scene`, or None if the scene cannot support one
    (e.g. "What colour is the circle?" needs exactly one circle)."""
    unique_kinds = [k for k in KINDS if sum(s.kind == k for s in scene) == 1]
    if kind == "caption":
        return [_ask("Describe the picture."), _answer(caption(scene))]
    if kind == "count":
        return [_ask("How many shapes are there?"), _answer(str(len(scene)))]
    if kind == "shape":
        shape = scene[rng.integers(len(scene))]
        return [_ask(f"What shape is the {shape.colour} one?"), _answer(shape.kind)]
    if kind in ("colour", "follow_up"):
        if not unique_kinds:
            return None
        kind_asked = str(rng.choice(unique_kinds))
        colour = next(s.colour for s in scene if s.kind == kind_asked)
        if kind == "colour":
            return [_ask(f"What colour is the {kind_asked}?"), _answer(colour)]
        return [_ask(f"Is there a {kind_asked}?"), _answer("yes"),
                {"role": "user", "content": "What colour is it?"}, _answer(colour)]
    if kind == "exists":
        present = {(s.colour, s.kind) for s in scene}
        if rng.random() < 0.5:
            colour, kind_asked = sorted(present)[rng.integers(len(present))]
        else:  # a near miss: a colour that is in the picture on another shape, or a shape in another colour
            shape = scene[rng.integers(len(scene))]
            options = ([(shape.colour, k) for k in KINDS] + [(c, shape.kind) for c in COLOURS])
            options = [o for o in options if o not in present]
            colour, kind_asked = options[rng.integers(len(options))]
        return [_ask(f"Is there a {colour} {kind_asked}?"), _answer("yes" if (colour, kind_asked) in present else "no")]
    a, b = (scene[i] for i in rng.choice(len(scene), size=2, replace=False))
    if kind == "left_right":
        return [_ask(f"Is the {a.name} left or right of the {b.name}?"),
                _answer("left" if a.centre[0] < b.centre[0] else "right")]
    if kind == "above_below":
        return [_ask(f"Is the {a.name} above or below the {b.name}?"),
                _answer("above" if a.centre[1] < b.centre[1] else "below")]
    raise ValueError(f"unknown question kind {kind!r}")


def random_conversation(rng: np.random.Generator, kind: str, fits=None):
    """(scene, pixels, messages) for a fresh random scene and a conversation of `kind`;
    fits(messages) -> bool, if given, rejects conversations (too long for a small context)."""
    for _ in range(1000):
        low, high = SCENE_SIZES[kind]
        scene = random_scene(rng, int(rng.integers(low, high + 1)))
        messages = conversation_about(scene, kind, rng)
        if messages is not None and (fits is None or fits(messages)):
            return scene, draw(scene), messages
    raise UserError(f"no {kind} conversation fits the model's context; use a model with a larger block_size")


def fits_context(tokenizer, max_tokens: int, n_image_tokens: int = N_IMAGE_TOKENS):
    """fits(messages): does the conversation take at most max_tokens tokens?"""
    return lambda messages: len(encode_image_conversation(tokenizer, messages, n_image_tokens)[0]) <= max_tokens


# ----------------------------------------------------------------------------- tokens

def encode_image_turn(tokenizer, message: dict, n_image_tokens: int) -> tuple[list[int], list[int]]:
    """Like step 4's encode_turn, but each "<image>" in a user turn becomes n_image_tokens copies of
    the <image> token: the positions whose embeddings the image's features replace. The <image>
    special token is the placeholder because the tokenizer already has it and its own embedding
    is never read (every such row is overwritten). User turns carry no loss, so the mask is 0."""
    if message["role"] != "user" or IMAGE not in message["content"]:
        return encode_turn(tokenizer, message)
    ids = list(encode_header(tokenizer, "user"))
    pieces = (CONTENT_PREFIX + message["content"]).split(IMAGE)
    for i, piece in enumerate(pieces):
        if i:
            ids += [tokenizer.image_id] * n_image_tokens
        ids += tokenizer.encode_ordinary(piece) if piece else []
    ids += [tokenizer.im_end_id] + tokenizer.encode_ordinary("\n")
    return ids, [0] * len(ids)


def encode_image_conversation(tokenizer, messages, n_image_tokens: int = N_IMAGE_TOKENS):
    """A conversation -> (ids, mask), every <image> expanded (see encode_image_turn)."""
    ids, mask = [], []
    for message in messages:
        turn_ids, turn_mask = encode_image_turn(tokenizer, message, n_image_tokens)
        ids += turn_ids
        mask += turn_mask
    return ids, mask


def image_tag_count(messages) -> int:
    return sum(m["content"].count(IMAGE) for m in messages if m.get("role") == "user")


def collate_images(examples: list[ImageExample], pad_id: int) -> dict:
    """Step 4's collate (pad, shift: "idx", "targets"), plus "images": the pictures of all rows in one
    (n, 3, H, W) tensor, in the order their placeholders come (row by row)."""
    return {**collate(examples, pad_id), "images": torch.cat([e.images for e in examples])}


def generated_examples(tokenizer, rng: np.random.Generator, kinds: list[str], max_tokens: int,
                       n_image_tokens: int = N_IMAGE_TOKENS):
    """One fresh ImageExample per entry of `kinds`, each at most max_tokens tokens long."""
    examples, fits = [], fits_context(tokenizer, max_tokens, n_image_tokens)
    for kind in kinds:
        _, pixels, messages = random_conversation(rng, kind, fits)
        ids, mask = encode_image_conversation(tokenizer, messages, n_image_tokens)
        examples.append(ImageExample(ids, mask, to_tensor(pixels)[None], kind))
    return examples


def generated_batch(tokenizer, mix: dict, batch_size: int, seed: int, step: int, micro: int, max_tokens: int,
                    n_image_tokens: int = N_IMAGE_TOKENS) -> dict:
    """Micro-batch `micro` of step `step`: fresh scenes every time, a pure function of the arguments
    (so a resumed run sees the same batches). `mix`: kind -> how often it is drawn."""
    rng = np.random.default_rng([seed, step, micro])
    names, weights = list(mix), np.array(list(mix.values()), dtype=float)
    kinds = rng.choice(names, size=batch_size, p=weights / weights.sum())
    examples = generated_examples(tokenizer, rng, list(kinds), max_tokens, n_image_tokens)
    return collate_images(examples, tokenizer.eot_id)


EVAL_SEED = 1_000_003  # held-out scenes come from their own random stream, never from a training seed


def held_out_set(n_per_kind: int, fits=None, seed: int = EVAL_SEED):
    """The fixed evaluation set: n_per_kind conversations of every question kind, as
    (kind, pixels, messages) triples. Training streams use [seed, step, micro] seeds; this one a
    single different seed, so none of its scenes is drawn in training (except the empty canvas,
    which is the same picture wherever it comes from)."""
    rng = np.random.default_rng(seed)
    return [(kind, *random_conversation(rng, kind, fits)[1:]) for kind in QUESTION_KINDS for _ in range(n_per_kind)]


# ----------------------------------------------------------------------------- your own files

def record_images(record: dict, folder: pathlib.Path) -> tuple[list[pathlib.Path] | None, str | None]:
    """The image paths of a record (resolved against the JSONL's folder), or what is wrong."""
    paths = record.get("image", [])
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        return None, '"image" must be a path or a list of paths'
    tags = image_tag_count(record["conversations"])
    if tags != len(paths):
        if not paths:
            return None, f"{tags} <image> tag(s) but no \"image\" path"
        if not tags:
            return None, f"{len(paths)} image(s) but no <image> tag in a user turn (put \"<image>\\n\" first)"
        return None, f"{tags} <image> tag(s) but {len(paths)} image(s)"
    return [folder / p for p in paths], None


def load_image_examples(path, tokenizer, max_tokens: int, strict: bool = False, verbose: bool = True,
                        n_image_tokens: int = N_IMAGE_TOKENS) -> list[ImageExample]:
    """Read a JSONL of image conversations. Each bad line names file, line and problem; strict: the
    first is a UserError, otherwise it is skipped and a summary counts the skips."""
    path = pathlib.Path(path)
    report = SkipReport(path, strict)
    examples = []
    for number, record in read_conversations(path, report):
        paths, problem = record_images(record, path.parent)
        images = []
        for image_path in paths or []:
            try:
                images.append(load_image(image_path))
            except UserError as err:
                problem = str(err)
                break
        ids, mask = encode_image_conversation(tokenizer, record["conversations"], n_image_tokens)
        if problem is None and len(ids) > max_tokens:
            problem = f"longer than the context ({len(ids)} tokens, the limit is {max_tokens})"
        if problem is not None:
            report.add(number, problem)
            continue
        images = torch.stack(images) if images else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
        examples.append(ImageExample(ids, mask, images, record.get("task"), number))
    summary = report.summary(len(examples) + sum(report.counts.values()))
    if verbose and summary:
        print(summary)
    if not examples:
        raise UserError(f"{path}: no usable conversation in the file{' (see above)' if summary else ''}")
    return examples


def write_samples(out_dir: pathlib.Path, n: int, seed: int) -> pathlib.Path:
    """n generated conversations as PNG files + samples.jsonl (the file format, to copy from) and a
    grid samples.png of the pictures with their conversations."""
    from step6_multimodal.evaluate import plot_grid

    rng = np.random.default_rng([seed, 99])
    kinds = ("caption",) + QUESTION_KINDS
    records, cells = [], []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        _, pixels, messages = random_conversation(rng, kind)
        save_png(pixels, out_dir / "samples" / f"{i:03d}.png")
        records.append({"image": f"samples/{i:03d}.png", "conversations": messages, "task": kind})
        text = "\n".join(f"{m['role'][0].upper()}: {m['content'].replace(IMAGE, '').strip()}" for m in messages)
        cells.append((pixels, text, None))
    write_jsonl(records, out_dir / "samples.jsonl")
    return plot_grid(cells, out_dir / "samples.png", "generated conversations (U: user, A: assistant)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--create_sample", action="store_true",
                        help="write sample pictures, samples.jsonl and a grid samples.png")
    parser.add_argument("--n", type=int, default=16, help="how many samples (default 16)")
    parser.add_argument("--check", default=None, metavar="FILE", help="load an image-conversation JSONL and report")
    parser.add_argument("--strict", action="store_true", help="with --check: stop at the first bad line")
    parser.add_argument("--block_size", type=int, default=256, help="context length for --check (default 256)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--out", default=None, help="output folder (default out/step6)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if not (args.create_sample or args.check):
        parser.error("choose --create_sample or --check FILE")
    result = {}
    if args.create_sample:
        out_dir = pathlib.Path(args.out or step_dir(6))
        grid = write_samples(out_dir, args.n, args.seed)
        print(f"wrote {args.n} pictures and {out_dir / 'samples.jsonl'}; look at {grid}")
        result["grid"] = grid
    if args.check:
        tokenizer = load_tokenizer(args.tokenizer)
        examples = load_image_examples(args.check, tokenizer, args.block_size + 1, strict=args.strict)
        print(f"{args.check}: {len(examples)} usable conversations, "
              f"{sum(len(e.images) for e in examples)} images, {sum(sum(e.mask) for e in examples)} trained tokens")
        result["examples"] = len(examples)
    return result


if __name__ == "__main__":
    run_main(main)
