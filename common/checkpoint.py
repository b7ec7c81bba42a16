"""Checkpoints are data, never code.

They are written atomically -- to a temporary file in the same folder, then
renamed over the target -- so a crash or Ctrl-C mid-write never leaves a
half-written file where a good one was. They are read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain
containers, so loading a checkpoint cannot run code.
"""
import os
import tempfile
from pathlib import Path

from common.cli import UserError, next_command

# torch is imported inside the functions that need it: step 1 writes files through
# atomic_write_text and stays free of torch's start-up time.


def _atomic_write(path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(obj: dict, path) -> None:
    """Save a dict of tensors / plain values atomically."""
    import torch

    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_checkpoint(path, map_location="cpu", hint: str = "") -> dict:
    """Load a checkpoint safely; a missing or corrupt file is a UserError.

    `hint` is the command that makes the file, e.g. "python step3_pretrain/train_pretrain.py".
    """
    import torch

    path = Path(path)
    then = f"; run {next_command(hint)}" if hint else ""
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found{then}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, pickle of code, not a torch file, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable checkpoint ({reason[:200]}){then}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}{then}")
    return obj
