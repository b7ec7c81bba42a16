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


ANY_CHECKPOINT = "python step3_pretrain/train_pretrain.py"  # what makes a checkpoint, when the caller names nothing


def load_checkpoint(path, map_location="cpu", hint: str = "") -> dict:
    """Load a checkpoint safely; a missing or corrupt file is a UserError.

    `hint` is the command that makes the file (default ANY_CHECKPOINT), named by every error.
    """
    import torch

    path = Path(path)
    then = f"; run {next_command(hint or ANY_CHECKPOINT)} to make one"
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found{then}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # truncated zip, pickle of code, not a torch file, ...
        # PyTorch's own message would advise weights_only=False: loading an untrusted pickle runs its code.
        raise UserError(f"{path}: not a checkpoint of this tutorial (it does not load as tensors and plain "
                        f"values: cut short, or another program's file){then}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a checkpoint of this tutorial (a {type(obj).__name__}, not a dict){then}")
    return obj


# ----------------------------------------------------------------------------- models

def checkpoint_dict(model, **extra) -> dict:
    """What a checkpoint holds for a model: {"config": dict, "model": state_dict, **extra}
    (extra: optimizer state, step, RNG state, ... for training; common/train.py saves
    "model" itself, so pass it checkpoint_meta={"config": model.config.to_dict()})."""
    return {"config": model.config.to_dict(), "model": model.state_dict(), **extra}


def load_weights(model, state_dict: dict, source: str = "checkpoint") -> None:
    """Load weights, or raise a one-line UserError that names what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k} is {tuple(state_dict[k].shape)} there but {tuple(own[k].shape)} here"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(wrong[:3] + ([f"missing {missing[:3]}"] if missing else [])
                           + ([f"unexpected {unexpected[:3]}"] if unexpected else []))
        raise UserError(f"{source}: this checkpoint was made for a different model config: {detail}")
    model.load_state_dict(state_dict)


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint", config=None):
    """Rebuild the model in a checkpoint dict. With `config` (a ModelConfig or dict), build that
    model instead and check that the checkpoint fits it."""
    from common.model import ModelConfig, Transformer

    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{source}: not a model checkpoint (it needs 'config' and 'model' entries)")
    saved = ModelConfig.from_dict(ckpt["config"], source)
    if config is None:
        config = saved
    elif isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    model = Transformer(config)
    try:
        load_weights(model, ckpt["model"], source)
    except UserError as err:
        differ = [f"{k}={v} there but {getattr(config, k)} here"
                  for k, v in saved.to_dict().items() if getattr(config, k) != v]
        if differ:
            raise UserError(f"{source}: this checkpoint was made for a different model config: "
                            + "; ".join(differ) + " (load it with its own config, or retrain)") from None
        raise err
    return model


def check_tokenizer(ckpt: dict, tokenizer_fingerprint: str, source) -> None:
    """Refuse a model and a tokenizer that do not belong together.

    The training scripts save the fingerprint of their tokenizer (step1_tokenizer.bpe.tokenizer_fingerprint)
    beside "config". A tokenizer retrained on other text can have the same vocabulary size and still give
    every id another meaning: the model would read nonsense without any error. Checkpoints saved before
    fingerprints carry none and are accepted unchecked."""
    saved = ckpt.get("tokenizer_fingerprint")
    if saved is not None and saved != tokenizer_fingerprint:
        raise UserError(f"{source} was trained with another tokenizer (fingerprint {saved}) than the one given "
                        f"(fingerprint {tokenizer_fingerprint}): pass the --tokenizer it was trained with, or "
                        f"train it again with this one")


def load_model(path, device="cpu", config=None, hint: str = "python step3_pretrain/train_pretrain.py",
               tokenizer_fingerprint: str | None = None):
    """Load a model checkpoint file (see checkpoint_dict) onto `device`, in eval mode. With
    `tokenizer_fingerprint` (of the tokenizer the caller will use), a model trained with another is refused."""
    ckpt = load_checkpoint(path, map_location="cpu", hint=hint)
    if tokenizer_fingerprint is not None:
        check_tokenizer(ckpt, tokenizer_fingerprint, path)
    return model_from_checkpoint(ckpt, str(path), config).to(device).eval()


def check_vocab(config, tokenizer) -> None:
    """Refuse a model whose vocabulary size differs from the tokenizer's: its ids would mean other tokens."""
    if config.vocab_size != tokenizer.vocab_size:
        raise UserError(f"the model has {config.vocab_size} token ids but the tokenizer has "
                        f"{tokenizer.vocab_size}: pass the --tokenizer it was trained with")
