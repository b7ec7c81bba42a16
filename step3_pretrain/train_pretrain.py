"""Pretraining: teach the model to predict the next token of the corpus.

    python step3_pretrain/data.py            # tokenize the corpus first
    python step3_pretrain/train_pretrain.py  # the default profile: minutes on a laptop CPU
    python step3_pretrain/train_pretrain.py --resume       # continue an interrupted run exactly
    torchrun --nproc_per_node=2 step3_pretrain/train_pretrain.py   # DDP, one share of the batch each

Writes out/step3/checkpoint.pt (everything needed to resume), out/step3/model.pt
(config + weights: what steps 4-6 start from), out/step3/loss_curve.png,
out/step3/samples.txt and out/step3/metrics.json. With --data DIR (other text, from
data.py --input), the model goes to DIR, beside its data, and out/step3's model stays.
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch

from common.checkpoint import checkpoint_dict, save_checkpoint
from common.cli import UserError, add_common_args, run_main
from common.device import pick_device
from common.distributed import init_distributed
from common.metrics import write_metrics
from common.model import ModelConfig, Transformer
from common.paths import step_dir
from common.seed import seed_everything
from common.train import TrainConfig, resolve_profile, train
from step1_tokenizer.bpe import load_tokenizer_with_fingerprint
from step2_model.inspect_model import count_trainable
from step3_pretrain.data import load_tokens, random_windows
from step3_pretrain.eval_ppl import evaluate_stream, token_byte_lengths

# Sizes for each profile. "default" fits the 10-minute budget on a 2-core laptop CPU;
# "gpu" is chosen automatically on CUDA. Any flag given on the command line wins.
# "quick" (common.model.QUICK_CONFIG) has the default's context, so that step 4's quick conversations
# fit it whole; two rows a step keep its tokens per step small.
PROFILES = {
    "quick":   dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=256,
                    max_steps=30, batch_size=2, grad_accum=1, lr=3e-3, warmup_steps=5, eval_every=15, ckpt_every=15),
    "default": dict(n_layer=4, n_head=8, n_kv_head=4, n_embd=256, block_size=256,
                    max_steps=600, batch_size=12, grad_accum=1, lr=2e-3, warmup_steps=50, eval_every=100,
                    ckpt_every=100),
    "gpu":     dict(n_layer=8, n_head=8, n_kv_head=4, n_embd=512, block_size=512,
                    max_steps=3000, batch_size=64, grad_accum=1, lr=1e-3, warmup_steps=200, eval_every=500,
                    ckpt_every=500),
}
MODEL_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size")
TRAIN_KEYS = ("max_steps", "batch_size", "grad_accum", "lr", "warmup_steps", "eval_every", "ckpt_every")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def flops_per_token(config: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's scores."""
    return 6 * n_params + 12 * config.n_layer * config.n_embd * config.block_size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="folder made by data.py (default out/step3)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--out", default=None, help="output folder (default: the --data folder, out/step3)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model: pays off on CUDA, and on a CPU at toy sizes only "
                             "(needs a C++ compiler)")
    parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                        help="RMSNorm and cross-entropy: Triton kernels on CUDA (auto) or plain PyTorch")
    parser.add_argument("--smear_keys", action="store_true",
                        help="each attention key mixes in the previous token's key by a learned share "
                             "(Olsson et al. 2022; common/model.py Attention.smear_keys); off by default")
    for key in MODEL_KEYS + TRAIN_KEYS:
        parser.add_argument(f"--{key}", type=type(PROFILES["default"][key]), default=None,
                            help=f"default {PROFILES['default'][key]} (quick: {PROFILES['quick'][key]})")
    add_common_args(parser)
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    dist = init_distributed(device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    seed_everything(args.seed)
    from common import kernels
    kernels.set_kernels(args.kernels)
    settings = resolve_profile(args, device, PROFILES)
    data_dir = pathlib.Path(args.data or step_dir(3))
    out_dir = pathlib.Path(args.out or data_dir)  # a model trained on other data stays beside that data
    train_tokens, meta = load_tokens(data_dir, "train", args.tokenizer)
    val_tokens, _ = load_tokens(data_dir, "val", args.tokenizer)
    block_size = settings["block_size"]
    if len(train_tokens) <= block_size + 1 or len(val_tokens) <= block_size + 1:
        raise UserError(f"--block_size {block_size} is longer than the data ({len(train_tokens)} train / "
                        f"{len(val_tokens)} validation tokens in {data_dir}); use a smaller --block_size")

    config = ModelConfig(vocab_size=meta["vocab_size"], smear_keys=args.smear_keys,
                         **{k: settings[k] for k in MODEL_KEYS})
    model = Transformer(config).to(device)
    n_params = count_trainable(model)[1]
    cfg = TrainConfig(compile=args.compile, **{k: settings[k] for k in TRAIN_KEYS})
    if dist.is_main:
        print(f"profile {settings['profile']} on {device}: {n_params / 1e6:.2f}M parameters, "
              f"{cfg.max_steps} steps x {cfg.batch_size * cfg.grad_accum * dist.world_size} sequences "
              f"x {block_size} tokens")
    tokenizer, fingerprint = load_tokenizer_with_fingerprint(args.tokenizer)  # saved with the model
    byte_lengths = token_byte_lengths(tokenizer)
    eval_tokens = 20_000 if args.quick else 100_000

    def eval_fn(m):
        return evaluate_stream(m, val_tokens, byte_lengths, block_size, max_tokens=eval_tokens, device=device)["loss"]

    result = train(
        model, cfg,
        lambda step, micro: random_windows(train_tokens, block_size, cfg.batch_size, args.seed, step, micro),
        device=device, checkpoint_path=out_dir / "checkpoint.pt", eval_fn=eval_fn, resume=args.resume,
        checkpoint_meta={"config": config.to_dict(), "tokenizer_fingerprint": fingerprint}, dist_info=dist,
        desc="pretrain", plot_path=out_dir / "loss_curve.png")
    if not dist.is_main:
        return result

    save_checkpoint(checkpoint_dict(model, tokenizer_fingerprint=fingerprint), out_dir / "model.pt")
    final = evaluate_stream(model, val_tokens, byte_lengths, block_size, max_tokens=eval_tokens, device=device)
    from step3_pretrain.sample import sample_texts
    samples = sample_texts(model, tokenizer, n=3, max_new_tokens=60 if args.quick else 120, seed=args.seed)
    (out_dir / "samples.txt").write_text("\n\n---\n\n".join(samples) + "\n", encoding="utf-8")
    metrics = {
        "profile": settings["profile"], "device": str(device), "world_size": dist.world_size, "params": n_params,
        "train_tokens": result["train_tokens"], "tokens_per_sec": result["tokens_per_sec"],
        "train_seconds": result["train_seconds"], "final_train_loss": round(result["final_train_loss"], 4),
        "val_loss": round(final["loss"], 4), "val_ppl": round(final["ppl"], 3), "val_bpb": round(final["bpb"], 4),
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((f for key, f in PEAK_BF16_FLOPS.items() if key in name), None)
        if peak:
            achieved = flops_per_token(config, n_params) * result["tokens_per_sec"] / dist.world_size
            metrics["mfu"] = round(achieved / peak, 4)
    write_metrics(3, metrics, folder=out_dir)
    print(f"val loss {final['loss']:.3f}  perplexity {final['ppl']:.2f}  {final['bpb']:.3f} bits/byte  "
          f"({result['tokens_per_sec']:,.0f} tokens/s, {result['train_seconds']:.0f} s)")
    print("sample:\n" + samples[0])
    return {**result, **metrics, "samples": samples}


if __name__ == "__main__":
    run_main(main)
