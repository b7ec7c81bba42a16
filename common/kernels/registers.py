"""How many registers each kernel needs -- measured without a GPU.

A Triton kernel whose block is too big for the registers of one thread block
"spills": values go to slow local memory and a bandwidth-bound kernel loses
much of its point. Triton can compile for an NVIDIA architecture on a machine
without a GPU, and the ptxas assembler that ships with Triton reports the
registers and spill bytes of the result. This script prints them for every
block size and warp count the launchers in rmsnorm_triton.py and
cross_entropy_triton.py pick; the limits there (MAX_HIDDEN, MAX_BLOCK_V) were
chosen from this table.

    python -m common.kernels.registers            # sm_90 (H100), bf16 and fp32
    python common/kernels/registers.py --arch 80  # sm_80 (A100)
"""
import argparse
import pathlib
import re
import subprocess
import sys
import tempfile

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from common.cli import UserError, run_main


def _jit_function(kernel):
    """The compilable JITFunction, also when the module was imported under TRITON_INTERPRET=1."""
    from triton.runtime.jit import JITFunction
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _signature(kernel_name: str, dtype: str) -> dict:
    """Argument types as the launcher passes them: data pointers of `dtype`,
    float32 side buffers, int64 targets, int32 sizes and strides."""
    fp32 = {"RSTD", "DW_PARTIAL", "LOSS", "LSE", "SCALE"}
    sig = {}
    for name in _kernels()[kernel_name].arg_names:
        if name.isupper() and name.startswith("BLOCK"):
            sig[name] = "constexpr"
        elif name == "TARGETS":
            sig[name] = "*i64"
        elif name.isupper():
            sig[name] = "*fp32" if name in fp32 else f"*{dtype}"
        else:
            sig[name] = "fp32" if name == "eps" else "i32"
    return sig


def _kernels() -> dict:
    from common.kernels import cross_entropy_triton, rmsnorm_triton
    kernels = {name: getattr(module, name) for module in (rmsnorm_triton, cross_entropy_triton)
               for name in dir(module) if name.startswith("_") and name.endswith("_kernel")}
    return {name: _jit_function(k) for name, k in kernels.items()}


def register_usage(kernel_name: str, dtype: str, block: int, num_warps: int, arch: int = 90) -> dict:
    """Compile one kernel for sm_<arch> and return {"registers": n, "spill_bytes": n}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = _kernels()[kernel_name]
    signature = _signature(kernel_name, dtype)
    block_arg = next(name for name in signature if name.startswith("BLOCK"))
    # Pointers are 16-byte aligned and sizes/strides multiples of 16 (hidden
    # 1024..8192, vocab 8k..128k), as the launcher would specialise them.
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
             if kind != "constexpr" and kind != "fp32" and name != "ignore_index"}
    compiled = triton.compile(ASTSource(fn, signature, {block_arg: block}, attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "enable_fp_fusion": True})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = pathlib.Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        result = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(ptx),
                                 "-o", str(pathlib.Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed for {kernel_name}: {result.stderr.strip()[:300]}")
    registers = int(re.search(r"Used (\d+) registers", result.stderr).group(1))
    spills = re.search(r"(\d+) bytes spill stores", result.stderr)
    return {"registers": registers, "spill_bytes": int(spills.group(1)) if spills else 0}


def launcher_configs(beyond_limit: bool = False):
    """(kernel, block, num_warps) for every block size the launchers can pick
    (and, with beyond_limit, the next RMSNorm block: the one they refuse)."""
    from common.kernels import cross_entropy_triton as ce
    from common.kernels import rmsnorm_triton as rms
    configs = []
    block = 64
    while block <= rms.MAX_HIDDEN * (2 if beyond_limit else 1):
        for name in ("_rms_norm_forward_kernel", "_rms_norm_backward_kernel"):
            configs.append((name, block, rms._num_warps(block)))
        block *= 2
    block = ce.MAX_BLOCK_V
    for name in ("_cross_entropy_forward_kernel", "_cross_entropy_backward_kernel"):
        configs.append((name, block, ce._num_warps(block)))
    return configs


def main(argv=None):
    parser = argparse.ArgumentParser(description="Registers and spills of the Triton kernels, "
                                                 "compiled for an NVIDIA GPU without needing one.")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 80 = A100, 90 = H100")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--beyond-limit", action="store_true",
                        help="also compile RMSNorm at twice MAX_HIDDEN, to see why the limit is there")
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as err:
        raise UserError(f"this needs Triton with its NVIDIA backend ({type(err).__name__}: {err}); "
                        "pip install triton (Linux)") from None
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in ("bf16", "fp16", "fp32")]
    if unknown:
        raise UserError(f"--dtypes: {', '.join(unknown)} not among bf16, fp16, fp32")
    rows = []
    print(f"| kernel | dtype | block | warps | registers/thread | spill bytes |  (sm_{args.arch})")
    print("|---|---|---:|---:|---:|---:|")
    for dtype in dtypes:
        for name, block, warps in launcher_configs(args.beyond_limit):
            usage = register_usage(name, dtype, block, warps, args.arch)
            rows.append({"kernel": name, "dtype": dtype, "block": block, "num_warps": warps, **usage})
            print(f"| {name.strip('_')} | {dtype} | {block} | {warps} | {usage['registers']} | "
                  f"{usage['spill_bytes']} |", flush=True)
    return rows


if __name__ == "__main__":
    run_main(main)
