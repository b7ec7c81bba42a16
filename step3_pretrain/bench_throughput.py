"""Training throughput on nanoGPT's CPU recipe, so the two can be compared on one machine.

    python step3_pretrain/bench_throughput.py

nanoGPT's README trains Shakespeare on a CPU with
    --device=cpu --compile=False --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
(65 characters of vocabulary, dropout 0). This script times our training step -- forward,
backward, gradient clipping, AdamW -- on that exact shape and prints tokens per second.
Ours differs inside (RMSNorm, RoPE, SwiGLU, no biases), not in size: the parameter counts
are about the same. What it measured: step3_pretrain/EXPERIMENTS.md, "Throughput against nanoGPT".

    python step3_pretrain/bench_throughput.py --against_gpt2

times ours beside nanoGPT's architecture (gpt2_reference.py) in one process, in alternating
rounds, each eager and compiled (and nanoGPT's model once more with our fused AdamW, to compare
the architectures alone), and prints each one's median tokens/s and the median of its per-round
ratio to nanoGPT's recipe (eager: the recipe says --compile=False). One process and alternation
matter: a CPU's speed drifts by more than the difference between the models.

    python step3_pretrain/bench_throughput.py --ops

times single operations at that shape instead, forward and backward: our RoPE against the
textbook formula, our RMSNorm against the LayerNorm nanoGPT uses. At this size a CPU spends
its time starting operations, so how many a layer runs matters more than their arithmetic.

    python step3_pretrain/bench_throughput.py --profile

runs training steps under torch.profiler and lists the operations one step calls, busiest
first: how many times, and the milliseconds spent inside them.
"""
import argparse
import pathlib
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from common.cli import UserError, add_common_args, run_main
from common.device import pick_device
from common.metrics import write_metrics
from common.model import ModelConfig, RMSNorm, Transformer, apply_rope, rope_tables
from common.train import TrainConfig, make_optimizer
from step2_model.inspect_model import count_trainable
from step3_pretrain.gpt2_reference import GPT2, nanogpt_optimizer

NANOGPT_CPU = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_kv_head=4, n_embd=128)
BATCH_SIZE = 12


def time_steps(model, optimizer, batch, steps: int, device) -> float:
    """Seconds per training step, after two warm-up steps."""
    x, y = batch
    for i in range(steps + 2):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def compare_with_gpt2(rounds: int, steps: int, compile_too: bool) -> dict:
    """Median tokens/s of ours and of nanoGPT's GPT-2 over alternating rounds in this process,
    and each one's median ratio to the GPT-2 run as nanoGPT's CPU recipe runs it (eager)."""
    def ours():
        model = Transformer(ModelConfig(**NANOGPT_CPU))
        return model, make_optimizer(model, TrainConfig(lr=1e-3))

    def nanogpt(fused_adamw: bool = False):
        model = GPT2(**NANOGPT_CPU)
        return model, nanogpt_optimizer(model, fused=fused_adamw)

    cpu, shape = torch.device("cpu"), (BATCH_SIZE, NANOGPT_CPU["block_size"])
    vocab = NANOGPT_CPU["vocab_size"]
    batch = (torch.randint(0, vocab, shape), torch.randint(0, vocab, shape))
    # nanoGPT's model with our fused AdamW as well: the architectures alone
    runs = {"ours": ours(), "nanogpt": nanogpt(), "nanogpt_fused_adamw": nanogpt(fused_adamw=True)}
    if compile_too:  # separate copies, so the eager runs stay eager
        for name, build in (("ours", ours), ("nanogpt", nanogpt)):
            model, optimizer = build()
            compiled = torch.compile(model)
            try:  # compiling happens on the first step, once per model
                time_steps(compiled, optimizer, batch, 1, cpu)
            except Exception as error:  # on a CPU, torch.compile needs a C++ compiler
                first_line = (str(error).strip().splitlines() or [""])[0]
                print(f"torch.compile failed ({type(error).__name__}: {first_line}); timing the eager models only")
                runs = {name: run for name, run in runs.items() if not name.endswith("_compiled")}
                break
            runs[f"{name}_compiled"] = (compiled, optimizer)
    tokens_per_sec = {name: [] for name in runs}
    for round_index in tqdm(range(rounds), desc="timing rounds", leave=False):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))  # no model always goes first
        for name in order:
            tokens_per_sec[name].append(BATCH_SIZE * shape[1] / time_steps(*runs[name], batch, steps, cpu))

    def median_ratio(name: str, to: str) -> float:
        return round(statistics.median(a / b for a, b in zip(tokens_per_sec[name], tokens_per_sec[to])), 3)

    result = {name: {"median_tokens_per_sec": round(statistics.median(values), 1),
                     "median_ratio_to_nanogpt": median_ratio(name, "nanogpt")}
              for name, values in tokens_per_sec.items()}
    if "nanogpt_compiled" in result:  # architecture against architecture, both compiled
        result["ours_compiled"]["median_ratio_to_nanogpt_compiled"] = median_ratio("ours_compiled", "nanogpt_compiled")
    return result


def textbook_rope(x, cos, sin):
    """The rotation as usually written: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos). Eight operations."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, :cos.size(-1) // 2], sin[:, sin.size(-1) // 2:]  # our tables hold each angle twice
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def profile_steps(model, optimizer, batch, steps: int) -> list[tuple[str, float, float]]:
    """(operation, calls per step, ms per step spent inside it) for our training step, busiest first.
    Nested calls count too: aten::linear calls aten::mm, and both are listed."""
    from torch.profiler import ProfilerActivity, profile

    time_steps(model, optimizer, batch, 1, torch.device("cpu"))  # warm-up, outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_steps(model, optimizer, batch, steps, torch.device("cpu"))
    n = steps + 2  # time_steps runs two warm-up steps before its timed ones
    rows = [(e.key, e.count / n, e.self_cpu_time_total / 1000 / n) for e in prof.key_averages()
            if e.key.startswith("aten::")]
    return sorted(rows, key=lambda row: -row[2])


def time_op(fn, x, repeats: int) -> float:
    """Microseconds for fn(x) forward and backward, after a warm-up."""
    for i in range(repeats + 10):
        if i == 10:
            started = time.perf_counter()
        fn(x).sum().backward()
    return (time.perf_counter() - started) / repeats * 1e6


def time_ops(repeats: int) -> dict:
    """Forward + backward of the small operations of one layer, at the recipe's shape."""
    config = ModelConfig(**NANOGPT_CPU)
    T, d, heads = config.block_size, config.n_embd, config.n_head
    cos, sin = rope_tables(config.head_dim, T)
    q = torch.randn(BATCH_SIZE, heads, T, config.head_dim, requires_grad=True)
    x = torch.randn(BATCH_SIZE, T, d, requires_grad=True)
    norm, layer_norm = RMSNorm(d), torch.nn.LayerNorm(d, bias=False)
    torch.testing.assert_close(apply_rope(q, cos, sin), textbook_rope(q, cos, sin))  # the same rotation
    return {"rope_us": time_op(lambda t: apply_rope(t, cos, sin), q, repeats),
            "textbook_rope_us": time_op(lambda t: textbook_rope(t, cos, sin), q, repeats),
            "rms_norm_us": time_op(norm, x, repeats), "layer_norm_us": time_op(layer_norm, x, repeats)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model first (fuses the small element-wise operations; "
                             "compiling takes a while on a CPU: EXPERIMENTS.md, 'Throughput against nanoGPT')")
    parser.add_argument("--against_gpt2", action="store_true",
                        help="time ours beside nanoGPT's GPT-2 in one process, alternating rounds, "
                             "each eager and compiled (no --compile needed)")
    parser.add_argument("--rounds", type=int, default=12, help="alternating rounds for --against_gpt2")
    parser.add_argument("--ops", action="store_true",
                        help="time single operations (RoPE, RMSNorm vs LayerNorm) instead of whole steps")
    parser.add_argument("--profile", action="store_true",
                        help="list the operations a training step calls, with their counts and times")
    add_common_args(parser)
    args = parser.parse_args(argv)
    # --against_gpt2 and --profile time CPU steps: "auto" means the CPU for them, even beside a GPU
    device = pick_device("cpu" if args.device == "auto" and (args.against_gpt2 or args.profile) else args.device)
    torch.manual_seed(args.seed)
    if args.ops:
        ops = {k: round(v, 1) for k, v in time_ops(20 if args.quick else 500).items()}
        print(f"one layer's small operations, forward + backward, on the CPU ({torch.get_num_threads()} threads):")
        print(f"  RoPE on the queries, ours (3 ops) {ops['rope_us']:.0f} us, "
              f"textbook (8 ops) {ops['textbook_rope_us']:.0f} us")
        print(f"  RMSNorm (ours) {ops['rms_norm_us']:.0f} us, LayerNorm (nanoGPT's, one fused kernel) "
              f"{ops['layer_norm_us']:.0f} us")
        if not args.quick:
            write_metrics(3, ops, section="bench_ops")
        return ops
    if args.against_gpt2:
        if device.type != "cpu":
            raise UserError("--against_gpt2 compares CPU training steps: run it with --device cpu")
        if args.rounds < 1:
            raise UserError(f"--rounds {args.rounds}: need at least one round")
        rounds, steps = (2, 2) if args.quick else (args.rounds, 20)
        result = compare_with_gpt2(rounds, steps, compile_too=not args.quick)
        print(f"{rounds} alternating rounds of {steps} steps, nanoGPT's CPU recipe shape "
              f"({torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)}); "
              f"median tokens/s, and median ratio to nanoGPT's recipe:")
        for name, row in result.items():
            print(f"  {name:<20} {row['median_tokens_per_sec']:>9,.0f}   {row['median_ratio_to_nanogpt']:.3f}")
        if "nanogpt_compiled" in result:
            print(f"  ours compiled / nanoGPT compiled, median per round: "
                  f"{result['ours_compiled']['median_ratio_to_nanogpt_compiled']:.3f}")
        if not args.quick:
            settings = {"rounds": rounds, "steps_per_round": steps, "threads": torch.get_num_threads()}
            write_metrics(3, {**result, **settings}, section="bench_against_gpt2")
        return result
    steps = 5 if args.quick else args.steps
    model = Transformer(ModelConfig(**NANOGPT_CPU)).to(device)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3))
    shape = (BATCH_SIZE, NANOGPT_CPU["block_size"])
    batch = (torch.randint(0, 65, shape, device=device), torch.randint(0, 65, shape, device=device))
    if args.profile:
        if device.type != "cpu" or args.compile:  # the profile records CPU operations, uncompiled
            raise UserError("--profile lists the CPU's operations: run it with --device cpu and without --compile")
        rows = profile_steps(model, optimizer, batch, steps)
        print(f"one training step calls {sum(r[1] for r in rows):.0f} operations (nested ones included); "
              f"the busiest, by time spent inside them:")
        for name, calls, ms in rows[:12]:
            print(f"  {name:<55} {calls:6.0f} calls {ms:8.2f} ms")
        return rows
    runner = torch.compile(model) if args.compile else model
    seconds = time_steps(runner, optimizer, batch, steps, device)
    tokens_per_sec = BATCH_SIZE * NANOGPT_CPU["block_size"] / seconds
    params = count_trainable(model)[1]
    print(f"nanoGPT CPU recipe shape on {device} ({torch.get_num_threads()} threads"
          f"{', compiled' if args.compile else ''}): "
          f"{tokens_per_sec:,.0f} tokens/s, {seconds * 1000:.1f} ms/step")
    print(f"parameters: {params / 1e6:.2f}M")
    result = {"tokens_per_sec": round(tokens_per_sec, 1), "ms_per_step": round(seconds * 1000, 2),
              "params": params, "device": str(device), "threads": torch.get_num_threads()}
    if not args.quick:
        write_metrics(3, result, section="bench_nanogpt_cpu_recipe" + ("_compiled" if args.compile else ""))
    return result


if __name__ == "__main__":
    run_main(main)
