"""Scoring a vision-language model on held-out questions, answering one, and the answers grid.

An answer counts as right when greedy decoding would write exactly the expected answer and then
<|im_end|>. That is the same as: with the right answer fed in (teacher forcing), the argmax at
every answer position is the right token. So one batched forward pass scores many questions.
Only the LAST answer of a conversation is scored: for a follow-up ("Is there a circle?" "yes"
"What colour is it?") that is the colour, the answer that needs the turn before.
"""
import textwrap
from collections import defaultdict

import numpy as np
import torch

from common.model import IGNORE_INDEX
from common.plot import new_figure, save_figure
from step1_tokenizer.bpe import IMAGE
from step4_sft.chat_template import decode_reply, encode_header
from step6_multimodal.data import ImageExample, collate_images, encode_image_conversation
from step6_multimodal.images import blank_image, to_tensor

REPLY_TOKENS = 16  # answers are one or two words; a caption takes up to ~20 tokens in chat.py (it asks for more)


def last_answer_only(mask: list[int]) -> list[int]:
    """Keep the mask's last run of 1s (the last assistant answer and its <|im_end|>), zero the rest."""
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [0] * start + [1] * (end - start) + [0] * (len(mask) - end)


def eval_examples(tokenizer, held_out, n_image_tokens: int, blank: bool = False) -> list[ImageExample]:
    """The held-out (kind, pixels, messages) triples as examples scored on their last answer;
    blank=True shows the empty canvas instead of each picture (the blank-image baseline)."""
    examples = []
    for kind, pixels, messages in held_out:
        ids, mask = encode_image_conversation(tokenizer, messages, n_image_tokens)
        image = blank_image() if blank else to_tensor(pixels)
        examples.append(ImageExample(ids, last_answer_only(mask), image[None], kind))
    return examples


@torch.no_grad()
def score(vlm, examples: list[ImageExample], pad_id: int, batch_size: int = 64) -> list[bool]:
    """For each example: is every scored token the argmax (= greedy decoding gets it exactly right)?"""
    device = next(vlm.parameters()).device
    right = []
    for first in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_images(examples[first:first + batch_size], pad_id).items()}
        logits, _ = vlm(batch["idx"], batch["images"])
        scored = batch["targets"] != IGNORE_INDEX
        wrong = (logits.argmax(-1) != batch["targets"]) & scored
        right += (~wrong.any(dim=1)).tolist()
    return right


def accuracy_by_kind(examples: list[ImageExample], right: list[bool]) -> dict:
    """{"overall": share right, kind: share right, ...}, as fractions."""
    by_kind = defaultdict(list)
    for example, ok in zip(examples, right):
        by_kind[example.kind].append(ok)
    result = {kind: float(np.mean(oks)) for kind, oks in by_kind.items()}
    return {"overall": float(np.mean(right)), **result}


def vqa_accuracy(vlm, tokenizer, held_out, blank: bool = False) -> dict:
    was_training = vlm.training
    vlm.eval()
    examples = eval_examples(tokenizer, held_out, vlm.n_image_tokens, blank)
    result = accuracy_by_kind(examples, score(vlm, examples, tokenizer.eot_id))
    vlm.train(was_training)
    return result


def prompt_ids(vlm, tokenizer, messages: list[dict]) -> list[int]:
    """What the model reads before its reply: the conversation, images expanded, then the assistant header."""
    ids = encode_image_conversation(tokenizer, messages, vlm.n_image_tokens)[0]
    return ids + encode_header(tokenizer, "assistant")


def answer(vlm, tokenizer, messages: list[dict], images: torch.Tensor, max_new_tokens: int = REPLY_TOKENS) -> str:
    """The model's greedy reply to `messages` (the last one a user turn), images (n, 3, H, W) in
    the order of the <image> tags."""
    device = next(vlm.parameters()).device
    idx = torch.tensor([prompt_ids(vlm, tokenizer, messages)], dtype=torch.long, device=device)
    new = vlm.generate(idx, images.to(device), max_new_tokens, tokenizer.im_end_id)
    return decode_reply(tokenizer, new)


def plot_grid(cells, path, title: str, columns: int = 4):
    """cells: (pixels, text, right) triples; right True/False colours the text green/red, None black."""
    rows = -(-len(cells) // columns)
    fig, _ = new_figure(2.6 * columns, 3.4 * rows + 0.4, ncols=1)
    fig.clf()
    for i, (pixels, text, right) in enumerate(cells):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(pixels, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        colour = {True: "green", False: "red", None: "black"}[right]
        wrapped = "\n".join(textwrap.fill(line, 34) for line in text.splitlines())
        ax.set_xlabel(wrapped, fontsize=7, color=colour)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def answers_grid(vlm, tokenizer, held_out, path, n: int = 16):
    """The first n held-out conversations of mixed kinds: picture, question, the model's answer
    (green when it is the expected one, red with the expected one when not)."""
    picks = held_out[::max(1, len(held_out) // n)][:n]
    cells = []
    for kind, pixels, messages in picks:
        reply = answer(vlm, tokenizer, messages[:-1], to_tensor(pixels)[None])
        expected = messages[-1]["content"]
        question = " / ".join(m["content"].replace(IMAGE, "").strip() for m in messages[:-1])
        text = f"{question}\n-> {reply}" + ("" if reply == expected else f" (expected {expected})")
        cells.append((pixels, text, reply == expected))
    return plot_grid(cells, path, "held-out pictures: the model's answers (green right, red wrong)")
