"""Ask the vision-language model about a picture.

    python step6_multimodal/chat.py --image out/step6/samples/001.png
    printf 'How many shapes are there?\\nIs there a red circle?\\n' | python step6_multimodal/chat.py --image pic.png

Any PNG or JPEG works: it is converted and resized the way training pictures are (images.py).
The picture goes into the first question (an "<image>" tag is put after it if you did not
type one); later questions can refer back ("What colour is it?"). /reset forgets the conversation
(the picture stays), /quit ends. The model knows what it was trained on: shapes on black.
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch

from common.checkpoint import check_vocab
from common.cli import UserError, add_common_args, run_main
from common.device import pick_device
from common.paths import step_dir
from step1_tokenizer.bpe import IMAGE, load_tokenizer_with_fingerprint
from step4_sft.chat import chat_loop
from step6_multimodal.data import image_tag_count
from step6_multimodal.evaluate import answer, prompt_ids
from step6_multimodal.images import load_image
from step6_multimodal.vision import load_vlm

REPLY_TOKENS = 48  # a caption of five shapes is the longest thing the model was taught to say
MIN_ROOM = 8      # tokens left for the reply, at least: a one-word answer and <|im_end|> with room to spare


class ImageChatSession:
    """The conversation about one picture (or none); what step 4's chat_loop talks to."""

    def __init__(self, vlm, tokenizer, image=None, max_new_tokens: int = REPLY_TOKENS):
        self.model, self.tokenizer, self.image, self.max_new_tokens = vlm, tokenizer, image, max_new_tokens
        self.reset()

    def reset(self) -> None:
        self.messages = []
        self.dropping = False  # chat_loop asks; we keep the picture's turn and say so ourselves

    def send(self, text: str):
        """Yield the reply to `text` (one piece), or a note in brackets when the turn cannot be asked."""
        if self.image is not None and not self.messages and IMAGE not in text:
            text = f"{text}\n{IMAGE}"  # the picture goes after the first question, as in training
        messages = self.messages + [{"role": "user", "content": text}]
        n_images = 0 if self.image is None else 1
        if image_tag_count(messages) != n_images:
            yield (f"(this chat has {n_images} picture(s) but the conversation would have "
                   f"{image_tag_count(messages)} <image> tag(s); pass --image FILE, or leave <image> out)")
            return
        room = min(self.max_new_tokens, MIN_ROOM)  # a reply may stop early at the context's end, not before this
        while len(prompt_ids(self.model, self.tokenizer, messages)) + room > self.model.config.block_size:
            if len(messages) <= 3:
                yield "(this question does not fit the model's context; /reset starts afresh)"
                return
            messages = messages[:2] + messages[4:]  # keep the picture's turn, drop the oldest after it
        size = self.model.vision_config.image_size
        images = self.image[None] if self.image is not None else torch.zeros(0, 3, size, size)
        reply = answer(self.model, self.tokenizer, messages, images, self.max_new_tokens)
        self.messages = messages + [{"role": "assistant", "content": reply}]
        yield reply


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=None, help="the picture to talk about (PNG, JPEG, ...)")
    parser.add_argument("--checkpoint", default=None, help="vision-language model (default out/step6/vlm.pt)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--max_new_tokens", type=int, default=REPLY_TOKENS,
                        help=f"longest reply (default {REPLY_TOKENS})")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} must be at least 1")
    device = pick_device(args.device)
    tokenizer, fingerprint = load_tokenizer_with_fingerprint(args.tokenizer)
    vlm = load_vlm(args.checkpoint or step_dir(6) / "vlm.pt", device, tokenizer_fingerprint=fingerprint)
    check_vocab(vlm.config, tokenizer)
    image = load_image(args.image) if args.image else None
    session = ImageChatSession(vlm, tokenizer, image, args.max_new_tokens)
    chat_loop(session, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())
    return session.messages


if __name__ == "__main__":
    run_main(main)
