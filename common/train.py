"""The training loop every step shares.

Steps 3 to 6 differ only in what a batch is, which positions carry loss and
which parameters train; they pass those in, and everything else lives here:
AdamW (no weight decay on norms and biases), warm-up then cosine decay, gradient
accumulation, gradient clipping, bf16 autocast on CUDA, optional torch.compile,
a progress bar, periodic validation, a loss-curve PNG, checkpoints that resume
exactly, Ctrl-C that saves before leaving, and DDP under torchrun.

Why resuming is exact: the batch of step s is a pure function of (seed, s,
micro-batch index) -- there is no data iterator whose position could be lost --
and a checkpoint holds the weights, the optimizer's moments, the step and the
RNG state (for dropout) as they were at the start of the next step.
"""
import contextlib
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common.checkpoint import load_checkpoint, save_checkpoint
from common.cli import UserError
from common.distributed import DistInfo, all_reduce_mean
from common.plot import new_figure, save_figure


def resolve_profile(args, device, profiles: dict) -> dict:
    """The settings of a run: the profile's ("quick" with --quick, "gpu" on CUDA, else "default"),
    then every flag the user gave (a flag left at None keeps the profile's value)."""
    profile = "quick" if args.quick else ("gpu" if device.type == "cuda" else "default")
    settings = {"profile": profile, **profiles[profile]}
    settings.update({k: v for k, v in vars(args).items() if k in settings and v is not None})
    return settings


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 16        # sequences per micro-batch, per process
    grad_accum: int = 1         # micro-batches per optimizer step, per process
    lr: float = 1e-3
    min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0      # 0 turns clipping off
    eval_every: int = 100       # 0: only at the end
    ckpt_every: int = 200       # 0: only at the end
    compile: bool = False       # torch.compile the model (CUDA pays off most)
    extra: dict = field(default_factory=dict)  # free-form settings a step wants kept in the checkpoint


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up (a fresh Adam's moment estimates are noisy), then cosine decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. Matrices decay; norm gains and biases
    (1-D) do not: shrinking a norm's gain towards 0 would fight the very scale it learns."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("no trainable parameters: every parameter has requires_grad=False")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused=True: one kernel updates every parameter (CPU and CUDA), instead of several per tensor
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def default_loss(model, batch: dict) -> torch.Tensor:
    """A batch is a dict of model keyword arguments, e.g. {"idx": x, "targets": y}."""
    return model(**batch)[1]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run in MiB (2**20 bytes): GPU allocations on CUDA, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def plot_losses(history: dict, path: Path, title: str) -> Path:
    fig, ax = new_figure()
    ax.plot(history["step"], history["loss"], label="train", linewidth=1)
    if history["val_step"]:
        ax.plot(history["val_step"], history["val_loss"], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.legend()
    return save_figure(fig, path)


def _kept_message(checkpoint_path: Path) -> str:
    if checkpoint_path.exists():
        return f"the last good checkpoint {checkpoint_path} is kept"
    return "no checkpoint was written"


def train(model: torch.nn.Module, cfg: TrainConfig, batch_fn, *, device: torch.device,
          checkpoint_path, eval_fn=None, loss_fn=default_loss, resume: bool = False,
          checkpoint_meta: dict | None = None, dist_info: DistInfo | None = None,
          desc: str = "train", plot_path=None) -> dict:
    """Train `model` for cfg.max_steps optimizer steps and return the run's figures.

    batch_fn(step, micro) -> dict of tensors: the micro-batch `micro` of step `step`
        (micro counts over all processes: rank r uses r*grad_accum ... r*grad_accum+grad_accum-1,
        so N processes see exactly the batches one process would with N times the accumulation).
    eval_fn(model) -> float: validation loss, called every cfg.eval_every steps and at the end.
    checkpoint_meta: saved beside the weights (e.g. {"model_config": ...}) so the file stands alone.
    """
    info = dist_info or DistInfo()
    checkpoint_path = Path(checkpoint_path)
    optimizer = make_optimizer(model, cfg)
    history = {"step": [], "loss": [], "lr": [], "val_step": [], "val_loss": []}
    start_step = 0
    if resume:
        if not checkpoint_path.exists():
            raise UserError(f"{checkpoint_path}: nothing to resume from; run without --resume first")
        state = load_checkpoint(checkpoint_path)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:  # e.g. a model option (--smear_keys, a size) other than the run's
            raise UserError(f"{checkpoint_path}: its weights do not fit this model "
                            f"({str(err).splitlines()[0][:160]}); resume with the options it was started with") from None
        optimizer.load_state_dict(state["optimizer"])
        start_step, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        if info.is_main:
            print(f"resuming {checkpoint_path} at step {start_step}")

    def save(step: int, rng: dict) -> None:
        if info.is_main:
            save_checkpoint({**(checkpoint_meta or {}), "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "step": step, "history": history,
                             "rng": rng, "train_config": asdict(cfg)}, checkpoint_path)

    def rng_state() -> dict:
        state = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(device)
        return state

    def evaluate(step: int) -> None:
        if eval_fn is None or not info.is_main:
            return
        model.eval()
        with torch.no_grad(), autocast():
            val = float(eval_fn(model))
        model.train()
        history["val_step"].append(step)
        history["val_loss"].append(val)

    ddp = None
    if info.world_size > 1:  # averages gradients across processes during backward
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    runner = torch.compile(ddp or model) if cfg.compile else (ddp or model)

    def autocast():
        # bf16 on CUDA: half the memory traffic, same exponent range as fp32 (no loss scaling needed).
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    model.train()
    tokens_seen, started = 0, time.time()
    bar = tqdm(range(start_step, cfg.max_steps), desc=desc, initial=start_step, total=cfg.max_steps,
               disable=not info.is_main, dynamic_ncols=True)
    step = start_step
    rng_at_step_start = rng_state()
    try:
        for step in bar:
            rng_at_step_start = rng_state()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in
                         batch_fn(step, info.rank * cfg.grad_accum + micro).items()}
                # Gradients are only exchanged between processes on the last micro-batch.
                last = micro == cfg.grad_accum - 1
                with ddp.no_sync() if (ddp is not None and not last) else contextlib.nullcontext():
                    with autocast():
                        loss = loss_fn(runner, batch)
                    if not torch.isfinite(loss):
                        raise UserError(f"loss became {loss.item()} at step {step}; "
                                        f"{_kept_message(checkpoint_path)}. Try a lower --lr or a smaller model")
                    (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                tokens_seen += next(iter(batch.values())).numel() * info.world_size
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = all_reduce_mean(step_loss, info, device)
            history["step"].append(step + 1)
            history["loss"].append(step_loss)
            history["lr"].append(lr_at(step, cfg))
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
                evaluate(done)
            if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.max_steps:
                save(done, rng_state())
            elapsed = time.time() - started
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):,.0f}")
    except KeyboardInterrupt:
        # The step in flight is discarded; the state saved is the one after the last finished step.
        completed = len(history["step"]) and history["step"][-1]
        save(completed, rng_at_step_start if completed == step else rng_state())
        if info.is_main:
            print(f"\ninterrupted: saved {checkpoint_path} at step {completed}; continue with --resume")
        raise
    train_seconds = time.time() - started
    evaluate(cfg.max_steps)
    save(cfg.max_steps, rng_state())
    if plot_path is not None and info.is_main:
        plot_losses(history, plot_path, desc)
    return {
        "steps": cfg.max_steps,
        "train_tokens": tokens_seen,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_sec": round(tokens_seen / max(train_seconds, 1e-9), 1),
        "final_train_loss": history["loss"][-1] if history["loss"] else None,
        "val_loss": history["val_loss"][-1] if history["val_loss"] else None,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "history": history,
    }
