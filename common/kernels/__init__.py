"""Optional Triton kernels, and the switch that picks them or plain PyTorch.

    from common.kernels import rms_norm, cross_entropy, set_kernels
    y = rms_norm(x, weight, eps=1e-5)             # x (..., hidden), weight (hidden,)
    loss = cross_entropy(logits, targets)         # logits (..., vocab), targets (...) ids, -100 = ignore
    set_kernels("torch")                          # "auto" (default) | "triton" | "torch"

"auto" runs the Triton kernel when Triton is installed and the tensor is on a
CUDA GPU, and the PyTorch reference (reference.py) everywhere else -- the
CPU, Apple MPS, Windows. "triton" insists on the kernels (an error where they
cannot run); "torch" never uses them. Either way the result is the same
function: the tests compare the two paths, forward and backward.

Inputs the kernels were not written for never give a wrong answer: a
non-contiguous tensor is copied to a contiguous one first; an unsupported
dtype or a row too wide for the RMSNorm kernel runs the PyTorch reference and
says so once (warnings.warn).

Importing this package never fails for want of Triton (macOS, Windows, or a
CPU-only install): everything then takes the PyTorch path.
"""
import os
import warnings

import torch

from common.cli import UserError
from common.kernels.reference import cross_entropy_reference, rms_norm_reference

_cross_entropy_triton = _rmsnorm_triton = None
TRITON_AVAILABLE = False
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # Nothing to launch the kernels on: skip importing Triton (over a second of start-up).
    TRITON_IMPORT_ERROR = "no CUDA GPU here (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
else:
    try:  # Triton is Linux + NVIDIA (or AMD) only; elsewhere this import fails
        from common.kernels import cross_entropy_triton as _cross_entropy_triton
        from common.kernels import rmsnorm_triton as _rmsnorm_triton
        TRITON_AVAILABLE = True
        TRITON_IMPORT_ERROR = None
    except Exception as err:  # ImportError, or a broken install: fall back, never fail the import
        TRITON_IMPORT_ERROR = f"{type(err).__name__}: {err}"

MODES = ("auto", "triton", "torch")
MODE = "auto"  # read by rms_norm / cross_entropy on every call; change it with set_kernels
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_warned = set()  # messages already shown: each fallback is announced once, not every step


def set_kernels(mode: str) -> str:
    """Choose "auto", "triton" or "torch" for every later call; returns the previous mode."""
    global MODE
    if mode not in MODES:
        raise UserError(f"kernels mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "triton" and not TRITON_AVAILABLE:
        raise UserError(f"kernels mode 'triton' cannot run here ({TRITON_IMPORT_ERROR}); "
                        "pip install triton (Linux with an NVIDIA GPU), or use 'auto'")
    previous, MODE = MODE, mode
    return previous


def get_kernels() -> str:
    return MODE


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _can_launch(module, tensor: torch.Tensor) -> bool:
    """Can this kernel module run on this tensor? CUDA tensors always; CPU
    tensors only when the kernels were defined under TRITON_INTERPRET=1."""
    return tensor.is_cuda or (module.INTERPRETED and tensor.device.type == "cpu")


def _use_triton(module, name: str, tensor: torch.Tensor, unsupported: str | None) -> bool:
    """True to run the Triton kernel. `unsupported` names why this input cannot
    (None when it can): then the reference runs, with a one-time warning."""
    if MODE == "torch" or tensor.numel() == 0:
        return False
    if MODE == "auto" and not (TRITON_AVAILABLE and tensor.is_cuda):
        return False  # the normal path on CPU/MPS/Windows: nothing to warn about
    if not _can_launch(module, tensor):  # MODE == "triton"
        raise UserError(f"kernels mode 'triton': {name} got a tensor on {tensor.device}, but the Triton kernels "
                        "run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); use set_kernels('auto')")
    if unsupported is not None:
        _warn_once(f"common.kernels.{name}: {unsupported}; using the PyTorch reference instead")
        return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x / sqrt(mean(x^2, last dim) + eps) * weight; output in x's dtype, float32 arithmetic."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) "
                         f"to match the last dimension of x {tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight on {weight.device}")
    unsupported = None
    if x.dtype not in KERNEL_DTYPES or weight.dtype not in KERNEL_DTYPES:
        unsupported = f"dtype {x.dtype} / weight {weight.dtype} is not float32, float16 or bfloat16"
    elif _rmsnorm_triton is not None and x.shape[-1] > _rmsnorm_triton.MAX_HIDDEN:
        unsupported = f"last dimension {x.shape[-1]} exceeds the kernel's limit of {_rmsnorm_triton.MAX_HIDDEN}"
    if not _use_triton(_rmsnorm_triton, "rms_norm", x, unsupported):
        return rms_norm_reference(x, weight, eps)
    return _rmsnorm_triton.RMSNormFunction.apply(x.contiguous(), weight.contiguous(), float(eps))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *,
                  inplace_backward: bool = False) -> torch.Tensor:
    """Mean cross-entropy over rows whose target is not ignore_index (0 if there are none).

    logits (..., vocab) float, targets (...) integer class ids. Returns a float32 scalar.
    inplace_backward=True lets the Triton backward write the gradient over the
    logits' memory (saves one logits-sized buffer; the logits are garbage
    afterwards, so only use it when nothing reads them after backward).
    The PyTorch path ignores it.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets shape {tuple(targets.shape)} does not match logits "
                         f"{tuple(logits.shape)} without its last (vocabulary) dimension")
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"cross_entropy: targets must be integer class ids, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"cross_entropy: logits are on {logits.device} but targets on {targets.device}")
    unsupported = None
    if logits.dtype not in KERNEL_DTYPES:
        unsupported = f"dtype {logits.dtype} is not float32, float16 or bfloat16"
    if not _use_triton(_cross_entropy_triton, "cross_entropy", logits, unsupported):
        return cross_entropy_reference(logits, targets, ignore_index)
    return _cross_entropy_triton.CrossEntropyFunction.apply(
        logits.contiguous(), targets.contiguous(), int(ignore_index), bool(inplace_backward))


__all__ = ["rms_norm", "cross_entropy", "set_kernels", "get_kernels", "rms_norm_reference",
           "cross_entropy_reference", "MODE", "MODES", "TRITON_AVAILABLE"]
