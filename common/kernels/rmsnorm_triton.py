"""RMSNorm as two Triton kernels (forward, backward) and the autograd.Function
that joins them. The PyTorch reference is `reference.rms_norm_reference`;
README.md derives the backward formulas used here.

    y = x * rstd * w,   rstd = 1 / sqrt(mean(x^2) + eps)          (per row)

Forward: one program per row. The whole row is loaded once into registers,
squared and summed in float32, scaled, multiplied by the weight and written
once. Eager PyTorch makes a separate pass over memory for each of pow, mean,
rsqrt-multiply and weight-multiply; here x is read once and y written once.

Backward: each program walks a contiguous group of rows. Per row it writes dx;
across its rows it accumulates w's gradient in registers and writes one
partial sum per program, which the host then sums: G rows of partials instead
of one per input row, and no atomics (so the result is deterministic).
"""
import contextlib
import math
import os

import torch
import triton
import triton.language as tl

# Was the interpreter on when the kernels below were defined? @triton.jit reads
# TRITON_INTERPRET at decoration time, so this records what these kernels are.
_knobs = getattr(triton, "knobs", None)  # older Triton versions read the variable directly
INTERPRETED = bool(_knobs.runtime.interpret) if _knobs else os.environ.get("TRITON_INTERPRET") == "1"

# The whole row lives in registers as float32. At 16384 columns the backward
# kernel needs more registers than a thread block has and spills to memory
# (ptxas for sm_90: see `python -m common.kernels.registers`); at 8192 it fits.
# The dispatcher in __init__.py sends wider rows to PyTorch instead.
MAX_HIDDEN = 8192
# Backward programs per streaming multiprocessor (SM): enough to keep every SM
# busy while a program waits on memory, few enough that the partial weight
# gradients (programs x hidden float32) stay small. A starting point for tuning.
PROGRAMS_PER_SM = 4


@triton.jit
def _rms_norm_forward_kernel(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps,
                             BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2**31
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols  # BLOCK_N is a power of two >= n_cols; mask the tail
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / n_cols  # masked lanes are 0: they add nothing
    rstd = 1.0 / tl.sqrt(mean_square + eps)
    tl.store(RSTD + row, rstd)  # 4 bytes per row saved for the backward pass
    y = x * rstd * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(DY, X, W, RSTD, DX, DW_PARTIAL,
                              stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program,
                              BLOCK_N: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # loaded once, used for every row
    dw_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    # int64 bounds make an int64 loop index: row * stride may pass 2**31
    row_start = program.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        dy_w = dy * w
        # dx = rstd * (dy*w - x_hat * mean(dy*w*x_hat))   (derived in README.md)
        dx = rstd * (dy_w - x_hat * (tl.sum(dy_w * x_hat, axis=0) / n_cols))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw_sum += dy * x_hat  # dw = sum over rows of dy * x_hat
    tl.store(DW_PARTIAL + program.to(tl.int64) * n_cols + cols, dw_sum, mask=mask)


def _on_device_of(tensor):
    """Launch on the tensor's GPU, not on whichever one is current (cuda:1 vs cuda:0)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _num_warps(block_n: int) -> int:
    # About 256 columns per warp: each thread then holds ~8 values (one 16-byte
    # load in bf16), between 1 and 16 warps.
    return min(max(block_n // 256, 1), 16)


def _backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, PROGRAMS_PER_SM * sm_count))
    return max(1, min(n_rows, 4))  # the CPU interpreter: few programs, and rows_per_program > 1 is exercised


def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float):
    """x2d: contiguous (rows, hidden). Returns y (x's dtype) and rstd (float32, one per row)."""
    n_rows, n_cols = x2d.shape
    y = torch.empty_like(x2d)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    block_n = triton.next_power_of_2(n_cols)
    with _on_device_of(x2d):
        _rms_norm_forward_kernel[(n_rows,)](
            x2d, weight, y, rstd, x2d.stride(0), y.stride(0), n_cols, eps,
            BLOCK_N=block_n, num_warps=_num_warps(block_n), enable_fp_fusion=True)
    return y, rstd


def rms_norm_backward(dy2d, x2d, weight, rstd):
    """Returns dx (x's dtype) and dweight (weight's dtype)."""
    n_rows, n_cols = x2d.shape
    dx = torch.empty_like(x2d)
    programs = _backward_programs(n_rows, x2d.device)
    rows_per_program = math.ceil(n_rows / programs)
    programs = math.ceil(n_rows / rows_per_program)  # no program left without rows
    dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x2d.device)
    block_n = triton.next_power_of_2(n_cols)
    with _on_device_of(x2d):
        _rms_norm_backward_kernel[(programs,)](
            dy2d, x2d, weight, rstd, dx, dw_partial,
            dy2d.stride(0), x2d.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
            BLOCK_N=block_n, num_warps=_num_warps(block_n), enable_fp_fusion=True)
    return dx, dw_partial.sum(dim=0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """rms_norm(x, weight, eps) with the Triton kernels; x (..., hidden) must be contiguous."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2d = x.reshape(-1, x.shape[-1])
        y, rstd = rms_norm_forward(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape).contiguous()
        dx, dweight = rms_norm_backward(dy2d, x2d, weight, rstd)
        return dx.view(dy.shape), (dweight if ctx.needs_input_grad[1] else None), None
