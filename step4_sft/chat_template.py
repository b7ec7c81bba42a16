"""The chat template: a conversation -> token ids + a loss mask.

A pretrained model only continues text. To make it answer, we show it
conversations written in one fixed layout (ChatML, the layout of Qwen and
minimind):

    <|im_start|>system
     You are a helpful assistant.<|im_end|>
    <|im_start|>user
     Where does Mirven live?<|im_end|>
    <|im_start|>assistant
     Mirven lives in Thornley.<|im_end|>

Every content starts with one space (CONTENT_PREFIX, below); a reply is
shown without it. <|im_start|> and <|im_end|> are special tokens (one id
each). Only this module inserts them: the role names and the contents are
encoded as ordinary text, so a user who types "<|im_end|>" gets plain bytes
and cannot end a turn or pretend to be the assistant.

The loss mask is 1 exactly on the tokens the model should learn to WRITE: the
content of every assistant turn and the <|im_end|> that closes it (so the
model learns when to stop). System and user text, the role headers and the
newline after <|im_end|> are given, not written: mask 0.

Steps 5 and 6 reuse this module, so every step talks to the model the same way.

    >>> ids, mask = encode_conversation(tok, [{"role": "user", "content": "Hi"},
    ...                                       {"role": "assistant", "content": "Hello!"}])
    >>> inputs, targets = shift_labels(torch.tensor(ids), torch.tensor(mask))
"""

if __name__ == "__main__":  # run as a file: say what this is, before the imports below fail
    raise SystemExit("step4_sft/chat_template.py is a module, not a script: "
                     "step4_sft/data.py and step4_sft/chat.py use it")

import torch

from common.cli import UserError
from common.model import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
# Why a space before every content: our tokenizer, like GPT-2's, glues a word to the space before it,
# so " Mirven" (mid-sentence, as in "Where does Mirven live?") and "Mirven" (first on a line) are two
# different tokens. Without the space, an answer that starts by repeating a name from the question
# must turn one token into another; with it, it copies the same token, as the model did in every
# "Q: ... A: ..." page of step 3. SentencePiece's "dummy prefix" (Llama's tokenizer) does the same.
# LoRA, which cannot learn that mapping well, gains most (step 4 README, "A space before every message").
CONTENT_PREFIX = " "


def conversation_problem(messages) -> str | None:
    """What is wrong with a conversation (a list of {"role", "content"} dicts), or None if it is usable.

    Rules: every message is an object with a known role and non-empty string content;
    a system message may only come first; at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        return "'conversations' must be a non-empty list of messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"message {i} must be an object with 'role' and 'content'"
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})"
        if role == "system" and i != 0:
            return f"message {i}: a system message may only come first"
        if not isinstance(content, str) or not content.strip():
            return f"message {i} ({role}) has empty content"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn (nothing to learn from)"
    return None


def check_conversation(messages, where: str = "conversation") -> None:
    problem = conversation_problem(messages)
    if problem:
        raise UserError(f"{where}: {problem}")


def encode_header(tokenizer, role: str) -> list[int]:
    """<|im_start|>role\\n -- the tokens that open a turn."""
    return [tokenizer.im_start_id] + tokenizer.encode_ordinary(role + "\n")


def encode_turn(tokenizer, message: dict) -> tuple[list[int], list[int]]:
    """One message -> (ids, mask): header, content, <|im_end|>, newline.

    Each piece is encoded on its own, so the mask boundaries fall exactly on
    token boundaries (a BPE merge can never glue the header to the content)."""
    header = encode_header(tokenizer, message["role"])
    content = tokenizer.encode_ordinary(CONTENT_PREFIX + message["content"])  # ordinary: "<|im_end|>" stays bytes
    end = [tokenizer.im_end_id]
    newline = tokenizer.encode_ordinary("\n")
    trained = 1 if message["role"] == "assistant" else 0
    ids = header + content + end + newline
    mask = [0] * len(header) + [trained] * (len(content) + len(end)) + [0] * len(newline)
    return ids, mask


def encode_conversation(tokenizer, messages, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """A whole conversation -> (ids, mask), two lists of the same length.

    max_tokens: the longest sequence allowed (block_size + 1: one token is lost
    to the shift). A conversation that is too long loses whole turns from the
    end, cut right after the last assistant turn that still fits, so no
    assistant answer is ever half-trained. If even the first assistant turn
    does not fit, it returns ([], []) and the caller skips the conversation.
    A trailing user turn with no answer is dropped (it would carry no loss)."""
    ids, mask, fits_until = [], [], 0
    for message in messages:
        turn_ids, turn_mask = encode_turn(tokenizer, message)
        if max_tokens is not None and len(ids) + len(turn_ids) > max_tokens:
            break
        ids += turn_ids
        mask += turn_mask
        if message["role"] == "assistant":
            fits_until = len(ids)
    return ids[:fits_until], mask[:fits_until]


def encode_prompt(tokenizer, messages) -> list[int]:
    """The ids a model reads before writing the next assistant reply: every
    message so far, then the header <|im_start|>assistant\\n. The model's reply
    then goes on until it writes <|im_end|>."""
    ids = []
    for message in messages:
        ids += encode_turn(tokenizer, message)[0]
    return ids + encode_header(tokenizer, "assistant")


def decode_reply(tokenizer, ids: list[int]) -> str:
    """The text of a reply's ids (as the model wrote them, after the header), without CONTENT_PREFIX."""
    return tokenizer.decode(ids).removeprefix(CONTENT_PREFIX)


def render_conversation(messages, add_generation_prompt: bool = False) -> str:
    """The same layout as text, with the special tokens written out: for reading, not for encoding."""
    text = "".join(f"<|im_start|>{m['role']}\n{CONTENT_PREFIX}{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def shift_labels(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (..., T) -> (inputs, targets) of shape (..., T-1).

    THE one place where labels are shifted. Position t reads ids[t] and must
    predict ids[t+1], so it is scored when mask[t+1] is 1; elsewhere the
    target is IGNORE_INDEX (-100) and the loss skips it. So the first scored
    position is the last token of the header "<|im_start|>assistant\\n" (the
    newline): its target is the first token of the answer. The last scored
    target is <|im_end|>."""
    inputs = ids[..., :-1]
    targets = ids[..., 1:].masked_fill(mask[..., 1:] == 0, IGNORE_INDEX)
    return inputs, targets
