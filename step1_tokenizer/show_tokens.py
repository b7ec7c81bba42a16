"""See how the tokenizer cuts text into tokens.

    python step1_tokenizer/show_tokens.py                      # an English and a Chinese sentence
    python step1_tokenizer/show_tokens.py "Any text you like"
    python step1_tokenizer/show_tokens.py "<|im_start|>user" --allow_special

Each token is shown in [brackets] (or in alternating colours on a terminal).
A token that holds only part of a character's UTF-8 bytes is shown as \\xNN:
a Chinese character is 3 bytes, and a tokenizer that never saw Chinese while
training has no merges for them, so each character costs 3 tokens.
"""
import sys
import pathlib

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse

from common.cli import add_quick_arg, run_main
from step1_tokenizer.bpe import default_tokenizer_path, load_tokenizer, render_token

EXAMPLES = {
    "English": "Late one evening, the baker found a blue dragon near the old bridge.",
    "Chinese": "分词器把文字切成小块。",
}
# ANSI background colours (black text on them), cycled from token to token
COLOURS = ["\033[30;48;5;153m", "\033[30;48;5;223m", "\033[30;48;5;151m", "\033[30;48;5;217m"]
RESET = "\033[0m"


def token_pieces(tok, ids):
    """What each token stands for, readable (see bpe.render_token)."""
    return [render_token(tok.token_bytes(i)) for i in ids]


def format_tokens(pieces, colour=False):
    if colour:
        return "".join(f"{COLOURS[n % len(COLOURS)]}{p}{RESET}" for n, p in enumerate(pieces))
    return "".join(f"[{p}]" for p in pieces)


def split_characters(tok, ids):
    """The characters whose bytes ended up in more than one token,
    e.g. ['分 = e5 88 86'], so the \\xNN pieces can be matched to characters."""
    cuts, position = set(), 0  # byte offsets where one token ends and the next begins
    for i in ids:
        position += len(tok.token_bytes(i))
        cuts.add(position)
    found, position = [], 0
    for ch in tok.decode(ids):
        size = len(ch.encode("utf-8"))
        if size > 1 and any(position < c < position + size for c in cuts):
            found.append(f"{ch} = {ch.encode('utf-8').hex(' ')}")
        position += size
    return found


def show(tok, label, text, ids, colour=False):
    """A few lines about one text and its token ids."""
    n_bytes = len(text.encode("utf-8"))
    lines = [
        f"{label}: {len(ids)} tokens for {n_bytes} bytes "
        f"({n_bytes / max(1, len(ids)):.2f} bytes per token)",
        "  " + format_tokens(token_pieces(tok, ids), colour),
        f"  ids: {ids}",
    ]
    split = split_characters(tok, ids)
    if split:
        lines.append(f"  characters split across byte tokens: {', '.join(split)}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Show a text cut into tokens.")
    parser.add_argument("text", nargs="?", default=None,
                        help="text to tokenize (default: an English and a Chinese example)")
    parser.add_argument("--tokenizer", type=pathlib.Path, default=None,
                        help="tokenizer file (default: out/tokenizer.json)")
    parser.add_argument("--allow_special", action="store_true",
                        help="turn special-token text such as <|endoftext|> into its single id")
    parser.add_argument("--colour", choices=["auto", "always", "never"], default="auto",
                        help="colour the tokens (auto: only when writing to a terminal)")
    add_quick_arg(parser, help="show the --quick run's tokenizer (out/quick/tokenizer.json)")
    args = parser.parse_args(argv)

    args.tokenizer = args.tokenizer or default_tokenizer_path()
    tok = load_tokenizer(args.tokenizer)
    colour = args.colour == "always" or (args.colour == "auto" and sys.stdout.isatty())
    examples = {"Text": args.text} if args.text is not None else EXAMPLES
    print(f"tokenizer: {args.tokenizer} ({tok.vocab_size} ids)")
    results = {}
    for label, text in examples.items():
        results[label] = tok.encode(text, allowed_special="all" if args.allow_special else "none")
        print(show(tok, label, text, results[label], colour))
    return results


if __name__ == "__main__":
    run_main(main)
