"""Look at what the model attends to: one heat map per layer and head.

    python step2_model/attention_map.py
    python step2_model/attention_map.py --text "The dragon of the north guards the bridge."
    python step2_model/attention_map.py --layer 0          # only the first layer

Row i of a map is query position i; its colours are the weights with which
it reads positions 0..i (each row sums to 1; everything right of the diagonal
is 0: the causal mask). Uses the model trained in step 3
(out/step3/model.pt) and its tokenizer (out/tokenizer.json) when they exist;
otherwise a randomly initialised model, whose maps are close to uniform over
the past -- the "before" picture. Writes out/step2/attention_map.png.
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dataclasses import replace

import torch

from common.checkpoint import load_model
from common.cli import UserError, add_common_args, next_command, run_main
from common.device import pick_device
from common.model import QUICK_CONFIG, ModelConfig, Transformer
from common.paths import step_dir
from common.plot import new_figure, save_figure
from common.seed import seed_everything
from step1_tokenizer.bpe import TRAIN_COMMAND, default_tokenizer_path, load_tokenizer_with_fingerprint, render_token
from step2_model.inspect_model import attention_maps

DEFAULT_TEXT = "Once upon a time, a small dragon lived by the river."


def load_tokenizer_or_none(tokenizer_path):
    """(tokenizer or None, note, fingerprint or None): step 1's BPE tokenizer if its file loads."""
    explicit = tokenizer_path is not None
    path = pathlib.Path(tokenizer_path) if explicit else default_tokenizer_path()
    if not path.exists() and not explicit:
        return None, f"no tokenizer at {path} (run {next_command(TRAIN_COMMAND)})", None
    try:
        tokenizer, fingerprint = load_tokenizer_with_fingerprint(path)
        return tokenizer, f"BPE tokenizer {path}", fingerprint
    except UserError as err:
        if explicit:  # the learner asked for this file: say what is wrong with it
            raise
        return None, f"could not load {path} ({err})", None


def load_model_or_random(checkpoint, device, quick: bool, min_vocab: int = 0, tokenizer_fingerprint=None):
    """(model, note): the step-3 model if it loads, else a random one (with at least min_vocab tokens) and why.
    A model trained with another tokenizer than the one loaded (tokenizer_fingerprint) is refused."""
    explicit = checkpoint is not None
    path = pathlib.Path(checkpoint) if explicit else step_dir(3) / "model.pt"
    if path.exists():
        try:
            return load_model(path, device, tokenizer_fingerprint=tokenizer_fingerprint), f"trained model {path}"
        except UserError as err:
            if explicit:
                raise
            note = f"could not load {path} ({err})"
    elif explicit:
        raise UserError(f"{path}: checkpoint not found; run {next_command('python step3_pretrain/train_pretrain.py')} "
                        f"or leave out --checkpoint")
    else:
        note = f"no trained model at {path} yet (run step 3 to get one)"
    config = QUICK_CONFIG if quick else ModelConfig()
    config = replace(config, vocab_size=max(config.vocab_size, min_vocab))
    model = Transformer(config).to(device).eval()
    return model, f"RANDOMLY INITIALISED model: {note}"


def tokenize(text: str, tokenizer, vocab_size: int):
    """(ids, labels, note or None): with the tokenizer if it fits the model, else one token per UTF-8 byte."""
    if tokenizer is not None and tokenizer.vocab_size <= vocab_size:
        ids = tokenizer.encode(text)
        return ids, [render_token(tokenizer.token_bytes(i)) for i in ids], None
    why = "no tokenizer" if tokenizer is None else \
        f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}"
    # ids 0..255 are the bytes in every step-1 tokenizer, and every model here has vocab_size >= 256
    data = text.encode("utf-8")
    return [b % vocab_size for b in data], [render_token(bytes([b])) for b in data], \
        f"byte-level fallback, one token per byte ({why})"


def draw_maps(maps, labels, layers, title):
    """A figure with a grid of heat maps: one row per layer, one column per head."""
    n_head = maps[0].size(1)
    size = max(2.2, 0.16 * len(labels))
    fig, _ = new_figure(size * n_head, size * len(layers) + 0.6)
    fig.clf()  # new_figure gives one axis; we want a layers x heads grid
    grid = fig.subplots(len(layers), n_head, squeeze=False)
    for r, layer in enumerate(layers):
        for h in range(n_head):
            ax = grid[r][h]
            ax.imshow(maps[layer][0, h].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer} head {h}", fontsize=8)
            ticks = range(len(labels))
            ax.set_xticks(ticks, labels if r == len(layers) - 1 else [], rotation=90, fontsize=6)
            ax.set_yticks(ticks, labels if h == 0 else [], fontsize=6)
    fig.suptitle(title, fontsize=9)
    return fig


def attention_summary(maps) -> list[dict]:
    """Per layer and head: mean weight on the previous token and on the first token (query positions >= 1)."""
    rows = []
    for layer, m in enumerate(maps):
        m = m[0].float()  # (n_head, T, T), first sequence
        T = m.size(-1)
        for h in range(m.size(0)):
            previous = torch.stack([m[h, i, i - 1] for i in range(1, T)]).mean().item()
            first = m[h, 1:, 0].mean().item()
            rows.append({"layer": layer, "head": h, "previous_token": previous, "first_token": first})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the sentence to look at")
    parser.add_argument("--checkpoint", default=None, help="model file (default out/step3/model.pt if present)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json if present)")
    parser.add_argument("--layer", type=int, default=None, help="plot only this layer (default: all)")
    parser.add_argument("--max_tokens", type=int, default=24, help="look at the first N tokens only (default 24)")
    parser.add_argument("--out", default=None, help="PNG file (default out/step2/attention_map.png)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if not args.text:
        raise UserError("--text is empty; give a sentence to look at")
    if args.max_tokens < 2:
        raise UserError(f"--max_tokens {args.max_tokens}: need at least 2 tokens to see attention")
    seed_everything(args.seed)
    device = pick_device(args.device)

    tokenizer, tok_note, fingerprint = load_tokenizer_or_none(args.tokenizer)
    model, model_note = load_model_or_random(args.checkpoint, device, args.quick,
                                             tokenizer.vocab_size if tokenizer else 0, fingerprint)
    ids, labels, fallback_note = tokenize(args.text, tokenizer, model.config.vocab_size)
    tok_note = fallback_note + f"; {tok_note}" if fallback_note else tok_note
    limit = min(args.max_tokens, model.config.block_size)
    ids, labels = ids[:limit], labels[:limit]
    if len(ids) < 2:
        raise UserError(f"--text {args.text!r} is a single token; give a longer sentence")
    print(f"model:     {model_note}")
    print(f"tokenizer: {tok_note}")
    print(f"{len(ids)} tokens: {' | '.join(labels)}")

    maps = attention_maps(model, torch.tensor([ids], device=device))
    n_layer = len(maps)
    if args.layer is not None and not 0 <= args.layer < n_layer:
        raise UserError(f"--layer {args.layer}: the model has layers 0..{n_layer - 1}")
    layers = [args.layer] if args.layer is not None else list(range(n_layer))
    title = ("trained model" if model_note.startswith("trained") else "random model (untrained)") + \
        f": {args.text[:60]!r}"
    path = save_figure(draw_maps(maps, labels, layers, title), args.out or step_dir(2) / "attention_map.png")

    summary = attention_summary(maps)
    uniform = sum(1 / (i + 1) for i in range(1, len(ids))) / (len(ids) - 1)  # what a flat map gives
    print(f"\nmean weight a query puts on the previous / the first token (a flat map gives {uniform:.2f}):")
    for row in summary:
        if row["layer"] in layers:
            print(f"  layer {row['layer']} head {row['head']}: previous {row['previous_token']:.2f}   "
                  f"first {row['first_token']:.2f}")
    print(f"wrote {path}")
    return {"path": str(path), "n_tokens": len(ids), "trained": model_note.startswith("trained"),
            "maps": maps, "summary": summary, "uniform": uniform}


if __name__ == "__main__":
    run_main(main)
