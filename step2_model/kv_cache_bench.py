"""How much does the KV cache speed up generation? Tokens per second with and without it.

    python step2_model/kv_cache_bench.py
    python step2_model/kv_cache_bench.py --new_tokens 500 --block_size 512

Without the cache, every new token runs the model over the whole context
again: step t costs O(t), so generating n tokens costs O(n^2). With the cache
the model reads only the new token and looks up the keys and values it
stored for the earlier ones: each step costs about the same. The benchmark
generates greedily from a randomly initialised model (speed does not depend
on the weights), checks that both ways produce the same tokens, and prints
how much memory the cache takes with grouped-query attention and without.

Writes out/step2/kv_cache.png (milliseconds per token against position) and
the figures to out/step2/metrics.json.
"""
import argparse
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dataclasses import replace

import torch
from tqdm import tqdm

from common.cli import UserError, add_common_args, add_model_args, config_from_args, run_main
from common.device import pick_device
from common.metrics import write_metrics
from common.model import QUICK_CONFIG, ModelConfig, Transformer, kv_cache_bytes
from common.paths import step_dir
from common.plot import new_figure, save_figure
from common.seed import seed_everything
from step2_model.inspect_model import count_trainable

QUICK = dict(QUICK_CONFIG.to_dict(), new_tokens=48, repeats=1)
# A large published GQA model's shapes (Llama-2-70B: 80 layers, 64 query heads, 8 kv heads of 128),
# only to show what GQA saves at scale; nothing is built.
BIG = dict(name="Llama-2-70B shapes", n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, seq_len=4096)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(model, prompt, new_tokens: int, use_cache: bool, device) -> tuple[torch.Tensor, list]:
    """Greedy-generate; return the tokens and the seconds each one took."""
    tokens, seconds = [], []
    sync(device)
    last = time.perf_counter()
    for token in model.generate_stream(prompt, new_tokens, temperature=0.0, use_cache=use_cache):
        sync(device)
        now = time.perf_counter()
        tokens.append(token)
        seconds.append(now - last)
        last = now
    return torch.stack(tokens, dim=1), seconds


def kv_memory_rows(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """(label, bytes with GQA, bytes with plain multi-head) for this model and a big one."""
    ours = (f"this model, {cfg.block_size} tokens, float32", kv_cache_bytes(cfg, cfg.block_size),
            kv_cache_bytes(replace(cfg, n_kv_head=cfg.n_head), cfg.block_size))
    big = ModelConfig(vocab_size=32000, block_size=BIG["seq_len"], n_layer=BIG["n_layer"], n_head=BIG["n_head"],
                      n_kv_head=BIG["n_kv_head"], n_embd=BIG["n_embd"])
    theirs = (f"{BIG['name']}, {BIG['seq_len']} tokens, bf16",
              kv_cache_bytes(big, BIG["seq_len"], bytes_per_value=2),
              kv_cache_bytes(replace(big, n_kv_head=big.n_head), BIG["seq_len"], bytes_per_value=2))
    return [ours, theirs]


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new_tokens", type=int, default=240, help="tokens to generate (default 240)")
    parser.add_argument("--prompt_tokens", type=int, default=8, help="length of the random prompt (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="time each mode this many times, keep the best")
    parser.add_argument("--out", default=None, help="plot file (default out/step2/kv_cache.png)")
    add_model_args(parser)
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.quick:  # smaller defaults; flags given on the command line still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.new_tokens < 1 or args.prompt_tokens < 1 or args.repeats < 1:
        raise UserError("--new_tokens, --prompt_tokens and --repeats must be at least 1")
    if args.prompt_tokens + args.new_tokens > cfg.block_size:
        raise UserError(f"--prompt_tokens + --new_tokens = {args.prompt_tokens + args.new_tokens} does not fit "
                        f"--block_size {cfg.block_size}; generate fewer tokens or raise --block_size")
    seed_everything(args.seed)
    device = pick_device(args.device)
    model = Transformer(cfg).to(device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens), device=device)
    n_params = count_trainable(model)[1]
    print(f"{n_params / 1e6:.2f}M-parameter model on {device} ({torch.get_num_threads()} threads): "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy, best of {args.repeats}")

    for use_cache in (False, True):  # warm-up: the first calls pay for allocations and kernel choice
        time_generation(model, prompt, 4, use_cache, device)
    best = {}
    progress = tqdm(total=2 * args.repeats, desc="timing generation", leave=False)
    for use_cache in (False, True):
        runs = []
        for _ in range(args.repeats):
            runs.append(time_generation(model, prompt, args.new_tokens, use_cache, device))
            progress.update()
        tokens, seconds = min(runs, key=lambda run: sum(run[1]))
        best[use_cache] = (tokens, seconds)
    progress.close()
    same = torch.equal(best[False][0], best[True][0])

    print(f"\n{'mode':<12} {'tokens/s':>10} {'ms/token':>9} {'first token ms':>15} {'last token ms':>14}")
    figures = {}
    for use_cache, name in ((False, "no cache"), (True, "KV cache")):
        seconds = best[use_cache][1]
        rate = len(seconds) / sum(seconds)
        print(f"{name:<12} {rate:>10,.0f} {1000 / rate:>9.2f} {1000 * seconds[0]:>15.2f} "
              f"{1000 * seconds[-1]:>14.2f}")
        figures["with_cache" if use_cache else "without_cache"] = round(rate, 1)
    speedup = figures["with_cache"] / figures["without_cache"]
    print(f"speed-up: {speedup:.1f}x   same tokens both ways: {same}")

    print(f"\nKV cache memory per sequence: n_kv_head={cfg.n_kv_head} (GQA) vs n_kv_head=n_head (multi-head)")
    memory = {}
    for label, gqa, mha in kv_memory_rows(cfg):
        print(f"  {label:<42} {human_bytes(gqa):>11} vs {human_bytes(mha):>11}  ({mha // gqa}x less)")
        memory[label] = {"gqa_bytes": gqa, "mha_bytes": mha}

    fig, ax = new_figure()
    for use_cache, name in ((False, "no cache"), (True, "KV cache")):
        positions = range(args.prompt_tokens, args.prompt_tokens + args.new_tokens)
        ax.plot(list(positions), [1000 * s for s in best[use_cache][1]], label=name, linewidth=1)
    ax.set(xlabel="position of the new token", ylabel="ms per token", title=f"generation on {device}")
    ax.legend()
    path = save_figure(fig, args.out or step_dir(2) / "kv_cache.png")
    print(f"wrote {path}")

    result = {"tokens_per_sec_without_cache": figures["without_cache"],
              "tokens_per_sec_with_cache": figures["with_cache"], "speedup": round(speedup, 2),
              "same_tokens": same, "new_tokens": args.new_tokens, "device": str(device),
              "params": n_params, "kv_cache_memory": memory}
    write_metrics(2, result, section="kv_cache")
    return result


if __name__ == "__main__":
    run_main(main)
