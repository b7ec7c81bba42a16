"""Device choice: the fastest one present unless the user forces one."""
import torch

from common.cli import UserError


def pick_device(name: str = "auto") -> torch.device:
    """cuda, then mps (Apple GPUs), then cpu; `name` forces one."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but this machine has no MPS device; use --device cpu")
    return torch.device(name)
