"""Cross-entropy over the vocabulary without materialising the softmax.

The PyTorch reference is `reference.cross_entropy_reference`; README.md
derives the gradient used here.

    loss_row = logsumexp(logits_row) - logits_row[target]
    loss     = sum(loss_row over rows whose target != ignore_index) / max(n_valid, 1)

Forward: one program per row walks the vocabulary in blocks of BLOCK_V and
keeps a running maximum m and a running sum s of exp(x - m) ("online
log-sum-exp"): when a block raises the maximum, the sum so far is rescaled by
exp(m_old - m_new). The row is read once; only two floats per row are written
(the row's loss and its log-sum-exp, kept for the backward pass). Nothing of
size rows x vocab is written.

Backward: one program per row reads the row again and writes
dlogits = (softmax - onehot(target)) * grad_output / n_valid, with
softmax = exp(x - logsumexp) rebuilt from the saved log-sum-exp.

Where the gradient is computed (a choice; README.md has the byte counts):
in the backward pass, not the forward pass. Computing it in the forward
would cost an extra read of the row there, would keep a rows x vocab gradient
alive from forward to backward, and would be wasted work in evaluation (no
backward at all). With `inplace_backward=True` the backward writes dlogits
over the logits' own memory, so no second rows x vocab buffer is allocated
at all -- only safe when nothing reads the logits after backward, hence
opt-in.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

# See rmsnorm_triton.py: whether these kernels were defined under TRITON_INTERPRET=1.
_knobs = getattr(triton, "knobs", None)  # older Triton versions read the variable directly
INTERPRETED = bool(_knobs.runtime.interpret) if _knobs else os.environ.get("TRITON_INTERPRET") == "1"

# Columns per block. The row loops over blocks, so any vocabulary size works;
# the block only bounds the registers a program needs. 8192 columns over 16
# warps is 16 values per thread, well under the register budget (see
# `python -m common.kernels.registers`). A starting point for tuning with bench.py.
MAX_BLOCK_V = 8192


@triton.jit
def _cross_entropy_forward_kernel(LOGITS, TARGETS, LOSS, LSE, stride_logits, n_cols, ignore_index,
                                  BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row).to(tl.int64)
    row_logits = LOGITS + row * stride_logits
    loss = 0.0
    lse = 0.0
    if target != ignore_index:  # an ignored row costs one load, not a pass over the vocabulary
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_logits + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            # Shift by 0 while every value so far is -inf, so that exp never
            # sees -inf - (-inf) = NaN; exp(-inf) = 0 then adds nothing.
            shift = tl.where(new_max == -float("inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        in_range = (target >= 0) & (target < n_cols)
        # A class id outside [0, vocab) cannot be checked on the host without a
        # GPU->CPU sync; it gives a NaN loss instead of reading foreign memory.
        target_logit = tl.load(row_logits + target, mask=in_range, other=float("nan")).to(tl.float32)
        loss = lse - target_logit
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)


@triton.jit
def _cross_entropy_backward_kernel(LOGITS, TARGETS, LSE, SCALE, DLOGITS, stride_logits, stride_dlogits,
                                   n_cols, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row).to(tl.int64)
    row_logits = LOGITS + row * stride_logits
    row_dlogits = DLOGITS + row * stride_dlogits
    if target == ignore_index:
        # Ignored rows contribute nothing: their gradient is exactly zero.
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
            tl.store(row_dlogits + cols, zeros.to(DLOGITS.dtype.element_ty), mask=cols < n_cols)
    else:
        lse = tl.load(LSE + row)
        scale = tl.load(SCALE)  # grad_output / n_valid, a device scalar: no host sync
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            x = tl.load(row_logits + cols, mask=mask, other=0.0).to(tl.float32)
            softmax = tl.exp(x - lse)
            grad = (softmax - tl.where(cols == target, 1.0, 0.0)) * scale
            # Same program, same block: each element is read before it is
            # written, so DLOGITS may be LOGITS itself (inplace_backward).
            tl.store(row_dlogits + cols, grad.to(DLOGITS.dtype.element_ty), mask=mask)


def _block_v(n_cols: int) -> int:
    return min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)


def _on_device_of(tensor):
    """Launch on the tensor's GPU, not on whichever one is current (cuda:1 vs cuda:0)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _num_warps(block_v: int) -> int:
    # About 512 columns per warp (16 per thread), between 1 and 16 warps.
    return min(max(block_v // 512, 1), 16)


def cross_entropy_forward(logits2d, targets1d, ignore_index: int):
    """logits2d: contiguous (rows, vocab). Returns per-row loss and log-sum-exp (float32)."""
    n_rows, n_cols = logits2d.shape
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=logits2d.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits2d.device)
    block_v = _block_v(n_cols)
    with _on_device_of(logits2d):
        _cross_entropy_forward_kernel[(n_rows,)](
            logits2d, targets1d, loss_rows, lse, logits2d.stride(0), n_cols, ignore_index,
            BLOCK_V=block_v, num_warps=_num_warps(block_v), enable_fp_fusion=True)
    return loss_rows, lse


def cross_entropy_backward(logits2d, targets1d, lse, scale, ignore_index: int, inplace: bool = False):
    """Returns dlogits (rows, vocab) in logits' dtype; `scale` is a float32 device scalar."""
    n_rows, n_cols = logits2d.shape
    dlogits = logits2d if inplace else torch.empty_like(logits2d)
    block_v = _block_v(n_cols)
    with _on_device_of(logits2d):
        _cross_entropy_backward_kernel[(n_rows,)](
            logits2d, targets1d, lse, scale, dlogits, logits2d.stride(0), dlogits.stride(0),
            n_cols, ignore_index, BLOCK_V=block_v, num_warps=_num_warps(block_v), enable_fp_fusion=True)
    return dlogits


class CrossEntropyFunction(torch.autograd.Function):
    """Mean cross-entropy over non-ignored rows; logits (..., V) contiguous, targets (...) int."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, inplace_backward=False):
        logits2d = logits.reshape(-1, logits.shape[-1])
        targets1d = targets.reshape(-1)
        loss_rows, lse = cross_entropy_forward(logits2d, targets1d, ignore_index)
        # Counted on the device: no .item(), so no GPU->CPU sync.
        n_valid = (targets1d != ignore_index).sum().clamp(min=1).float()
        ctx.save_for_backward(logits2d, targets1d, lse, n_valid)
        ctx.ignore_index, ctx.inplace = ignore_index, inplace_backward
        ctx.logits_shape = logits.shape
        return loss_rows.sum() / n_valid  # all rows ignored: 0 / 1 = 0, not NaN

    @staticmethod
    def backward(ctx, grad_output):
        logits2d, targets1d, lse, n_valid = ctx.saved_tensors
        scale = (grad_output.float() / n_valid).reshape(1)
        dlogits = cross_entropy_backward(logits2d, targets1d, lse, scale, ctx.ignore_index, inplace=ctx.inplace)
        if ctx.inplace:
            # The logits now hold gradients. Bump their version counter so that
            # any other autograd node that saved them fails loudly instead of
            # silently using gradients as logits.
            torch.autograd.graph.increment_version(logits2d)
        return dlogits.view(ctx.logits_shape), None, None, None
