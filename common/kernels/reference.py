"""The PyTorch references: what the Triton kernels must compute.

These few lines are the *definition*. The kernels in rmsnorm_triton.py and
cross_entropy_triton.py compute the same numbers with less memory traffic, and the
tests compare the two, forward and backward. They are also the path every
machine without an NVIDIA GPU takes (CPU, Apple MPS, Windows).

Both do their arithmetic in float32 whatever the input dtype: a bf16 sum of
thousands of squares or of exponentials loses too many bits.
"""
import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension.

    The output has x's dtype; the arithmetic is float32.
    """
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)  # one number per row
    return (x32 * rstd * weight.float()).to(x.dtype)


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor,
                            ignore_index: int = -100) -> torch.Tensor:
    """Mean of -log softmax(logits)[target] over the rows whose target is not ignore_index.

    logits (..., V) and targets (...) of class ids. Returns a float32 scalar.
    Unlike F.cross_entropy(reduction="mean"), a batch where every row is
    ignored gives 0 (and zero gradients), not 0/0 = NaN: a batch of pure
    padding or pure prompt tokens must not poison the training run.
    """
    logits2d = logits.reshape(-1, logits.shape[-1]).float()
    targets1d = targets.reshape(-1)
    loss_sum = F.cross_entropy(logits2d, targets1d, ignore_index=ignore_index, reduction="sum")
    n_valid = (targets1d != ignore_index).sum().clamp(min=1)
    return loss_sum / n_valid
