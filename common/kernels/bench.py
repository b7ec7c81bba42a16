"""Benchmark the Triton kernels against PyTorch eager and torch.compile.

    python common/kernels/bench.py            # every shape (a few minutes on one GPU)
    python common/kernels/bench.py --quick    # two shapes per kernel

Needs a CUDA GPU; elsewhere it says so and exits 0. For each shape it prints,
forward and forward+backward: the time of the PyTorch reference (eager), of
torch.compile of the same reference, and of the Triton kernel; the Triton
kernel's achieved bandwidth; its speedup over both; and for cross-entropy
the peak memory of each. It first measures the GPU's copy bandwidth (one big
tensor copy) and shows RMSNorm's bandwidth as a share of it: a
bandwidth-bound kernel cannot beat a copy, so that share says how much is
left to gain. It also checks, on every shape, that the kernel's outputs and
gradients match the reference.

"GB/s" counts the bytes the fused kernel must move (README.md has the
formulas), divided by the time: the same byte count for every
implementation, so it is an effective bandwidth, comparable across columns.

Writes out/kernels/bench.json and prints the tables as markdown.
"""
import argparse
import json
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import torch

from common.checkpoint import atomic_write_text
from common.cli import add_quick_arg, run_main
from common.kernels import TRITON_AVAILABLE, TRITON_IMPORT_ERROR, cross_entropy_reference, rms_norm_reference
from common import paths
from common.seed import seed_everything

# (rows, hidden). rows = batch x sequence length. The first is tutorial-sized
# (our model runs on a laptop); the rest are the sizes where kernels matter.
RMS_SHAPES = [(4096, 512), (4096, 1024), (16384, 1024), (16384, 4096), (65536, 4096), (16384, 8192), (65536, 8192)]
RMS_SHAPES_QUICK = [(4096, 1024), (16384, 4096)]
# (rows, vocab). 65536 rows x 128k vocab would need ~16 GiB of bf16 logits
# alone, and eager PyTorch several times that: the largest here is 16384 x 128k.
CE_SHAPES = [(4096, 8192), (16384, 8192), (4096, 32768), (16384, 32768), (4096, 131072), (16384, 131072)]
CE_SHAPES_QUICK = [(4096, 32768), (8192, 131072)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cuda_timer(fn, grad_to_none=()) -> float:
    """Median milliseconds of fn() on the GPU. triton.testing.do_bench flushes
    the L2 cache between runs, and resets the .grad of `grad_to_none` so that
    no run pays for accumulating into the previous run's gradient."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none) or None,
                                   return_mode="median")


def wall_timer(fn, grad_to_none=(), repeats: int = 2) -> float:
    """Milliseconds of fn() by the wall clock: only for trying this script's logic on the CPU."""
    fn()
    total = 0.0
    for _ in range(repeats):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        total += time.perf_counter() - start
    return total * 1000 / repeats


def rms_norm_bytes(rows: int, hidden: int, itemsize: int, backward: bool) -> int:
    """Bytes the fused kernels must move: forward reads x and writes y; backward
    reads x and dy and writes dx (weight, rstd and partial sums are tiny)."""
    row_bytes = rows * hidden * itemsize
    return (2 + 3 * backward) * row_bytes + hidden * itemsize + rows * 4


def cross_entropy_bytes(rows: int, vocab: int, itemsize: int, backward: bool) -> int:
    """Forward reads the logits once; backward reads them again and writes dlogits."""
    return (1 + 2 * backward) * rows * vocab * itemsize + rows * 8


def copy_bandwidth(device, timer, n_bytes: int = 1 << 30) -> float:
    """GB/s of a plain device-to-device copy: read n_bytes, write n_bytes."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * n_bytes / ms / 1e6


def _peak_mib(fn, device) -> float | None:
    """Peak memory allocated by fn() beyond what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _compiled(reference, use_compile: bool):
    if not use_compile:
        return None
    torch._dynamo.reset()  # fresh per shape: no recompile limit, no silent fallback to eager
    return torch.compile(reference, dynamic=False)


def _time_all(impls: dict, timer, grad_to_none) -> dict:
    """{name: ms or None}; an implementation that fails (out of memory, compile error) gets None."""
    times = {}
    for name, fn in impls.items():
        if fn is None:
            times[name] = None
            continue
        try:
            for t in grad_to_none:
                t.grad = None
            times[name] = timer(fn, grad_to_none)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            print(f"  {name}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            times[name] = None
        finally:
            for t in grad_to_none:
                t.grad = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return times


def _row(kernel, shape, dtype_name, pass_name, times, n_bytes, **extra) -> dict:
    triton_ms, eager_ms, compile_ms = times.get("triton"), times.get("eager"), times.get("compile")
    ratio = lambda a, b: round(a / b, 2) if a and b else None  # noqa: E731
    return {"kernel": kernel, "rows": shape[0], "cols": shape[1], "dtype": dtype_name, "pass": pass_name,
            "ms": {k: (round(v, 4) if v else None) for k, v in times.items()},
            "triton_gbps": round(n_bytes / triton_ms / 1e6, 1) if triton_ms else None,
            "speedup_vs_eager": ratio(eager_ms, triton_ms), "speedup_vs_compile": ratio(compile_ms, triton_ms),
            **extra}


def bench_rms_norm(shape, dtype_name, device, timer, use_compile, copy_gbps):
    from common.kernels.rmsnorm_triton import RMSNormFunction
    rows, hidden = shape
    dtype = DTYPES[dtype_name]
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    dy = torch.randn_like(x)
    eps = 1e-5
    compiled = _compiled(rms_norm_reference, use_compile)
    impls = {"eager": lambda a, w: rms_norm_reference(a, w, eps),
             "compile": (lambda a, w: compiled(a, w, eps)) if compiled else None,
             "triton": lambda a, w: RMSNormFunction.apply(a, w, eps)}

    # Correctness on this very shape, before any timing.
    xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y, y_ref = impls["triton"](xg, wg), rms_norm_reference(xr, wr, eps)
    y.backward(dy)
    y_ref.backward(dy)
    errors = {"y": _max_err(y, y_ref), "dx": _max_err(xg.grad, xr.grad), "dweight": _max_err(wg.grad, wr.grad)}
    del xg, wg, xr, wr, y, y_ref

    itemsize = x.element_size()
    fwd = {name: (lambda f=f: f(x, weight)) if f else None for name, f in impls.items()}
    fwd_times = _time_all(fwd, timer, [])
    fwd_bytes = rms_norm_bytes(rows, hidden, itemsize, backward=False)
    fwd_row = _row("rms_norm", shape, dtype_name, "forward", fwd_times, fwd_bytes, max_abs_err=errors)
    if fwd_row["triton_gbps"] and copy_gbps:
        fwd_row["pct_of_copy_bandwidth"] = round(100 * fwd_row["triton_gbps"] / copy_gbps, 1)

    xb, wb = x.clone().requires_grad_(), weight.clone().requires_grad_()
    both = {name: (lambda f=f: f(xb, wb).backward(dy)) if f else None for name, f in impls.items()}
    both_times = _time_all(both, timer, [xb, wb])
    both_bytes = rms_norm_bytes(rows, hidden, itemsize, backward=True)
    both_row = _row("rms_norm", shape, dtype_name, "forward+backward", both_times, both_bytes)
    if both_row["triton_gbps"] and copy_gbps:
        both_row["pct_of_copy_bandwidth"] = round(100 * both_row["triton_gbps"] / copy_gbps, 1)
    return [fwd_row, both_row]


def bench_cross_entropy(shape, dtype_name, device, timer, use_compile):
    from common.kernels.cross_entropy_triton import CrossEntropyFunction
    rows, vocab = shape
    dtype = DTYPES[dtype_name]
    logits = torch.randn(rows, vocab, dtype=dtype, device=device)
    targets = torch.randint(0, vocab, (rows,), device=device)  # none ignored: the pretraining case
    compiled = _compiled(cross_entropy_reference, use_compile)
    impls = {"eager": cross_entropy_reference,
             "compile": compiled,
             "triton": lambda a, t: CrossEntropyFunction.apply(a, t, -100, False),
             "triton_inplace": lambda a, t: CrossEntropyFunction.apply(a, t, -100, True)}

    lg, lr = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss, loss_ref = impls["triton"](lg, targets), cross_entropy_reference(lr, targets)
    loss.backward()
    loss_ref.backward()
    errors = {"loss": _max_err(loss, loss_ref), "dlogits": _max_err(lg.grad, lr.grad)}
    del lg, lr, loss, loss_ref

    itemsize = logits.element_size()
    fwd = {name: (lambda f=f: f(logits, targets)) if f else None
           for name, f in impls.items() if name != "triton_inplace"}
    fwd_times = _time_all(fwd, timer, [])
    fwd_row = _row("cross_entropy", shape, dtype_name, "forward", fwd_times,
                   cross_entropy_bytes(rows, vocab, itemsize, backward=False), max_abs_err=errors)

    # The timed runs of triton_inplace overwrite the logits with gradients; the
    # time of exp() does not depend on the values, so the timing still holds.
    lb = logits.clone().requires_grad_()
    both = {name: (lambda f=f: f(lb, targets).backward()) if f else None for name, f in impls.items()}
    both_times = _time_all(both, timer, [lb])
    peak = {}
    for name, fn in both.items():
        lb.grad = None
        try:
            peak[name] = None if fn is None else _peak_mib(fn, device)
        except (torch.cuda.OutOfMemoryError, RuntimeError):
            peak[name] = None
        lb.grad = None
    peak = {k: (round(v, 1) if v is not None else None) for k, v in peak.items()}
    both_row = _row("cross_entropy", shape, dtype_name, "forward+backward", both_times,
                    cross_entropy_bytes(rows, vocab, itemsize, backward=True), peak_mib=peak)
    return [fwd_row, both_row]


def run_benchmarks(rms_shapes, ce_shapes, dtype_name, device, timer, use_compile) -> dict:
    device = torch.device(device)
    copy_gbps = round(copy_bandwidth(device, timer, 1 << 30 if device.type == "cuda" else 1 << 20), 1)
    print(f"copy bandwidth: {copy_gbps} GB/s")
    results = []
    for shape in rms_shapes:
        print(f"rms_norm {shape} ...", flush=True)
        results += bench_rms_norm(shape, dtype_name, device, timer, use_compile, copy_gbps)
    for shape in ce_shapes:
        print(f"cross_entropy {shape} ...", flush=True)
        results += bench_cross_entropy(shape, dtype_name, device, timer, use_compile)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return {"device": name, "dtype": dtype_name, "copy_gbps": copy_gbps, "torch": torch.__version__,
            "results": results}


def markdown(report: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
    lines = [f"Device: {report['device']}, {report['dtype']}; copy bandwidth {fmt(report['copy_gbps'])} GB/s; "
             f"times in ms (median); GB/s = bytes the fused kernel must move / Triton time.", ""]
    for kernel, title in (("rms_norm", "RMSNorm (rows x hidden)"), ("cross_entropy", "Cross-entropy (rows x vocab)")):
        rows = [r for r in report["results"] if r["kernel"] == kernel]
        if not rows:
            continue
        extra = "% of copy" if kernel == "rms_norm" else "peak MiB eager / compile / triton / in-place"
        lines += [f"### {title}", "",
                  f"| shape | pass | eager | compile | triton | triton GB/s | x eager | x compile | {extra} |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            ms = r["ms"]
            if kernel == "rms_norm":
                last = fmt(r.get("pct_of_copy_bandwidth"))
            else:
                peak = r.get("peak_mib", {})
                last = " / ".join(fmt(peak.get(k)) for k in ("eager", "compile", "triton", "triton_inplace")) \
                    if peak else ""
            lines.append(f"| {r['rows']} x {r['cols']} | {r['pass']} | {fmt(ms.get('eager'))} | "
                         f"{fmt(ms.get('compile'))} | {fmt(ms.get('triton'))} | {fmt(r['triton_gbps'])} | "
                         f"{fmt(r['speedup_vs_eager'])} | {fmt(r['speedup_vs_compile'])} | {last} |")
        errors = [f"{r['rows']}x{r['cols']}: " + ", ".join(f"{k} {v:.2g}" for k, v in r["max_abs_err"].items())
                  for r in rows if "max_abs_err" in r]
        lines += ["", "Max |triton - reference| per shape: " + "; ".join(errors), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time the Triton kernels against PyTorch eager and "
                                                 "torch.compile (needs a CUDA GPU).")
    add_quick_arg(parser, help="two shapes per kernel instead of all; writes out/quick/kernels/bench.json")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of x and logits")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="where to write the results as JSON (default out/kernels/bench.json)")
    args = parser.parse_args(argv)
    args.out = args.out or paths.OUT_DIR / "kernels" / "bench.json"  # after parsing: --quick moves it
    if not torch.cuda.is_available():
        print("bench.py needs a CUDA GPU and torch sees none: nothing to measure here. "
              "The kernels' correctness is tested on the CPU: pytest tests/test_kernels.py")
        return {"skipped": "no CUDA GPU"}
    if not TRITON_AVAILABLE:
        print(f"bench.py needs Triton, which did not import ({TRITON_IMPORT_ERROR}): pip install triton")
        return {"skipped": "no Triton"}
    seed_everything(args.seed)
    report = run_benchmarks(RMS_SHAPES_QUICK if args.quick else RMS_SHAPES,
                            CE_SHAPES_QUICK if args.quick else CE_SHAPES,
                            args.dtype, "cuda", cuda_timer, use_compile=not args.no_compile)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    run_main(main)
