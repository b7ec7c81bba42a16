"""Device choice: the fastest one present unless the user forces one -- and how many CPU threads.

Threads, chosen on purpose: PyTorch gives every operation one thread per core. A tiny model's
operations are too small to share out, so the threads mostly wait for each other; and beside
another busy process (two processes each spinning two threads on two cores) they fight over the
cores, and the same work takes many times longer. So a --quick run and the test suite use one
thread; a default run keeps PyTorch's own choice (one thread per core, or OMP_NUM_THREADS when it
is set: torchrun sets 1 for each of its processes); `--threads N` decides for any run.
"""
import torch

from common import paths
from common.cli import UserError

TORCH_THREADS = torch.get_num_threads()  # PyTorch's choice at start-up: the cores, or OMP_NUM_THREADS
TINY_MODEL_THREADS = 1                   # --quick models and the tests
threads_asked: int | None = None         # --threads N (set by common.cli's flag through ask_threads)


def ask_threads(threads: int) -> None:
    """Use exactly `threads` CPU threads from now on (the --threads flag)."""
    global threads_asked
    if threads < 1:
        raise UserError(f"--threads {threads}: give 1 or more")
    threads_asked = threads
    torch.set_num_threads(threads)


def thread_count() -> int:
    """Threads for this run: --threads N, else one for a --quick run, else PyTorch's own choice."""
    if threads_asked is not None:
        return threads_asked
    return TINY_MODEL_THREADS if paths.quick_outputs() else TORCH_THREADS


def pick_device(name: str = "auto") -> torch.device:
    """cuda, then mps (Apple GPUs), then cpu; `name` forces one. Also sets the CPU thread count."""
    torch.set_num_threads(thread_count())
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
