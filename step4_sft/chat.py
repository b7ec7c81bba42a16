"""Talk to a fine-tuned model: a multi-turn chat with streaming output.

    python step4_sft/chat.py --checkpoint out/step4/sft_model.pt
    python step4_sft/chat.py --lora out/step4/lora_adapter.pt        # base out/step3/model.pt + adapter, merged
    python step4_sft/chat.py --system "You are a pirate." --temperature 0.8
    printf 'Hi, my name is Anna.\\nWhat is my name?\\n' | python step4_sft/chat.py    # one message per line

Commands: /reset forgets the conversation (the system prompt stays), /quit ends.

Each turn, the whole conversation so far goes through the chat template and the
model writes the reply token by token (with the KV cache, see common/model.py)
until it writes <|im_end|>. The model has no memory of its own: "remembering"
an earlier turn means that turn is in the prompt again. When the conversation
grows past the context, the oldest turns are dropped.
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch

from common.checkpoint import check_vocab, load_model
from common.cli import QUICK_MODEL_NOTE, UserError, add_common_args, run_main
from common.device import pick_device
from common.paths import step_dir
from step1_tokenizer.bpe import load_tokenizer_with_fingerprint
from step3_pretrain.train_pretrain import MODEL_KEYS, PROFILES
from step4_sft.chat_template import decode_reply, encode_prompt
from step4_sft.lora import load_adapter, merge_lora
from step4_sft.sft import MAKE_BASE

MAKE_SFT = "python step4_sft/train_sft.py"
# The reply's room comes out of the context: with block_size 256, a 64-token reply leaves 192
# tokens of conversation. (200 left 56, and the model "forgot" a name said two turns before.)
REPLY_TOKENS = 64
QUICK_PROFILE = PROFILES["quick"]


def load_chat_model(checkpoint=None, lora=None, device="cpu", merge: bool = True, tokenizer_fingerprint=None):
    """A model to talk to: `checkpoint` (default: the SFT model, or the step-3 model when an
    adapter is given), with the LoRA adapter `lora` put on and merged into the weights.
    tokenizer_fingerprint: of the tokenizer in use; a model trained with another is refused."""
    if checkpoint is None:
        checkpoint = step_dir(3) / "model.pt" if lora else step_dir(4) / "sft_model.pt"
    model = load_model(checkpoint, device, hint=MAKE_BASE if lora else MAKE_SFT,  # the command that makes it
                       tokenizer_fingerprint=tokenizer_fingerprint)
    if lora:
        load_adapter(model, lora)
        if merge:  # W + (alpha/r) B A computed once: afterwards as fast as the base model
            merge_lora(model)
    return model.eval()


def is_quick_size(model) -> bool:
    """Is this model of step 3's --quick size (a smoke test that cannot answer yet)?"""
    return all(getattr(model.config, key) == QUICK_PROFILE[key] for key in MODEL_KEYS)


def fit_prompt(tokenizer, messages: list[dict], budget: int) -> list[int]:
    """encode_prompt(messages), dropping the oldest turns (never the system prompt) until it fits
    `budget` tokens and starts with a user turn; a last message that alone is too long keeps its end."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        ids = encode_prompt(tokenizer, system + turns)
        if (len(ids) <= budget and turns[0]["role"] == "user") or len(turns) <= 1:
            return ids[-budget:]
        turns = turns[1:]


def prompt_budget(model, max_new_tokens: int) -> int:
    """Tokens of conversation that fit beside a reply of `max_new_tokens` in the context."""
    return model.config.block_size - min(max_new_tokens, model.config.block_size - 1)


def stream_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = REPLY_TOKENS,
                 temperature: float = 0.0, top_k: int | None = None, generator=None, allowed=None):
    """Yield the assistant's reply to `messages` as pieces of text while the model writes it.
    allowed: a (vocab,) bool mask of the only tokens it may write (None: any)."""
    device = next(model.parameters()).device
    prompt = fit_prompt(tokenizer, messages, prompt_budget(model, max_new_tokens))
    max_new_tokens = min(max_new_tokens, model.config.block_size - 1)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    new_ids, shown = [], ""
    for token in model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                       stop_tokens=[tokenizer.im_end_id], generator=generator, allowed=allowed):
        if int(token) == tokenizer.im_end_id:
            break
        new_ids.append(int(token))
        text = decode_reply(tokenizer, new_ids)
        if text.endswith("\ufffd") or text == shown:  # half a UTF-8 character, or only the leading space: wait
            continue
        yield text[len(shown):]
        shown = text
    text = decode_reply(tokenizer, new_ids)
    if text != shown:
        yield text[len(shown):]


def reply(model, tokenizer, messages: list[dict], **kwargs) -> str:
    """The whole reply at once (greedy by default): what eval_sft.py scores."""
    return "".join(stream_reply(model, tokenizer, messages, **kwargs))


class ChatSession:
    """The conversation so far, and one method to add a turn."""

    def __init__(self, model, tokenizer, system: str | None = None, **generation):
        self.model, self.tokenizer, self.system, self.generation = model, tokenizer, system, generation
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.dropping = False  # True once the oldest turns no longer fit the context

    def send(self, text: str):
        """Add the user's message; yield the reply in pieces; remember the reply."""
        self.messages.append({"role": "user", "content": text})
        budget = prompt_budget(self.model, self.generation.get("max_new_tokens", REPLY_TOKENS))
        self.dropping = len(encode_prompt(self.tokenizer, self.messages)) > budget
        pieces = []
        for piece in stream_reply(self.model, self.tokenizer, self.messages, **self.generation):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces)})


def chat_loop(session: ChatSession, lines, out, interactive: bool) -> int:
    """Read user messages from `lines`, write replies to `out` as they stream. Returns the turns answered."""
    turns = 0
    if interactive:
        out.write("type a message; /reset forgets the conversation, /quit ends\nyou> ")
        out.flush()
    for line in lines:
        text = line.strip()
        if not interactive and text:
            out.write(f"you> {text}\n")
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
        elif text:
            was_dropping = session.dropping
            out.write("assistant> ")
            for piece in session.send(text):
                out.write(piece)
                out.flush()
            out.write("\n")
            if session.dropping and not was_dropping:
                out.write(f"(the conversation no longer fits the model's {session.model.config.block_size}-token "
                          f"context: the oldest turns are left out from now on; /reset starts afresh)\n")
            turns += 1
        if interactive:
            out.write("you> ")
            out.flush()
    return turns


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help="model file (default out/step4/sft_model.pt; with --lora: out/step3/model.pt)")
    parser.add_argument("--lora", default=None, metavar="ADAPTER", help="a LoRA adapter from train_lora.py")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--system", default=None, help="system prompt that starts the conversation")
    parser.add_argument("--max_new_tokens", type=int, default=REPLY_TOKENS,
                        help=f"longest reply (default {REPLY_TOKENS}); its room comes out of the context, "
                             "so a larger value keeps fewer earlier turns")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); try 0.8")
    parser.add_argument("--top_k", type=int, default=None, help="sample only among the k likeliest tokens")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} must be at least 1")
    device = pick_device(args.device)
    tokenizer, fingerprint = load_tokenizer_with_fingerprint(args.tokenizer)
    model = load_chat_model(args.checkpoint, args.lora, device, tokenizer_fingerprint=fingerprint)
    check_vocab(model.config, tokenizer)
    if is_quick_size(model):
        print(f"note: this is {QUICK_MODEL_NOTE}", flush=True)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    session = ChatSession(model, tokenizer, args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, generator=generator)
    chat_loop(session, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())
    return session.messages


if __name__ == "__main__":
    run_main(main)
