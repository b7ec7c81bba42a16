"""Give the chat model eyes: teach a vision encoder to see, then join it to the language model as LLaVA does.

    python step6_multimodal/train_vlm.py                    # out/step4/sft_model.pt -> out/step6/vlm.pt
    python step6_multimodal/train_vlm.py --lora_r 8         # stage 2 with LoRA instead of every LM weight
    python step6_multimodal/train_vlm.py --data my.jsonl    # stage 2 on your own image conversations
    python step6_multimodal/train_vlm.py --quick            # seconds: a smoke test

Stage 0 (seeing): the encoder alone learns to name the shape under every patch, and the resampler's
slot i to report the shape of the i-th colour (pretrain_encoder.py); then the encoder is frozen.
Stage 1 (alignment): the language model is frozen too; the projector learns from captions
("a red circle, a blue square and a white triangle") to produce vectors the frozen model can read.
Stage 2 (instruction tuning): questions about colour, shape, existence, counts, left/right,
above/below and follow-ups; the language model trains too (or only LoRA matrices, --lora_r).
Every step draws fresh pictures, so the model never sees a picture twice and cannot memorise.

Writes out/step6/vlm.pt, metrics.json (held-out accuracy by question kind, and the same with a
blank picture, the evidence that answers come from the image) and answers.png.
"""
import argparse
import pathlib
import sys
import time
from dataclasses import replace

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from common.checkpoint import check_vocab, load_model
from common.cli import UserError, add_common_args, next_command, run_main
from common.device import pick_device
from common.metrics import write_metrics
from common.paths import step_dir
from common.seed import seed_everything
from common.train import TrainConfig, resolve_profile, train
from step1_tokenizer.bpe import load_tokenizer_with_fingerprint
from step2_model.inspect_model import count_trainable
from step4_sft.lora import ALL_LINEAR, apply_lora, merge_lora
from step6_multimodal.data import (EVAL_SEED, STAGE2_MIX, collate_images, fits_context, generated_batch,
                                   held_out_set, load_image_examples)
from step6_multimodal.evaluate import answers_grid, vqa_accuracy
from step6_multimodal.pretrain_encoder import PatchLabeller, labelled_batch, patch_accuracy
from step6_multimodal.vision import (VisionConfig, VisionLanguageModel, parameter_counts, save_vlm,
                                     vlm_checkpoint_meta)

MAKE_LM = "python step4_sft/train_sft.py"
# Any flag given on the command line wins over its profile. Stages 0 and 1 train parts that start
# from random weights (the encoder; the projector), so they take a larger learning rate than stage 2,
# which also moves the trained language model. Step counts are sized to the 10-minute budget (README: what they measured).
PROFILES = {
    "quick": dict(stage0_steps=10, stage0_batch_size=8, lr0=3e-3, stage1_steps=15, stage2_steps=25, batch_size=8,
                  lr1=2e-3, lr2=1e-3, warmup_steps=3, eval_per_kind=8),  # and QUICK_VISION below
    "default": dict(stage0_steps=500, stage0_batch_size=64, lr0=3e-3, stage1_steps=100, stage2_steps=1200,
                    batch_size=32, lr1=2e-3, lr2=1e-3, warmup_steps=30, eval_per_kind=200),
    "gpu": dict(stage0_steps=1000, stage0_batch_size=128, lr0=3e-3, stage1_steps=500, stage2_steps=2000,
                batch_size=64, lr1=2e-3, lr2=1e-3, warmup_steps=50, eval_per_kind=500),
}

# --quick's language model has a 64-token context and a tiny width: a smaller encoder (8x8-pixel
# patches, 16 of them), still with one slot per colour.
QUICK_VISION = VisionConfig(patch_size=8, width=32, n_layer=1, n_head=2, projector_hidden=64)


def add_args(parser):
    parser.add_argument("--checkpoint", default=None,
                        help="the language model (default out/step4/sft_model.pt, step 4's chat model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--data", default=None, help="stage 2 on this JSONL of image conversations "
                        "instead of generated ones (see data.py for the format; consider --tune_encoder)")
    parser.add_argument("--strict", action="store_true", help="with --data: stop at the first bad line")
    parser.add_argument("--out", default=None, help="output folder (default out/step6)")
    parser.add_argument("--lora_r", type=int, default=0,
                        help="stage 2: train LoRA matrices of this rank on every linear layer of the language "
                             "model instead of all its weights (default 0: all weights)")
    parser.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA scale alpha (default 16)")
    parser.add_argument("--tune_encoder", action="store_true",
                        help="keep training the encoder in stages 1 and 2 (default: frozen after stage 0, as LLaVA "
                             "keeps its CLIP frozen; with --stage0_steps 0 it is never frozen)")
    parser.add_argument("--patch_tokens", action="store_true",
                        help="hand the language model every patch vector, as LLaVA does, pixel-shuffled as "
                             "nanoVLM does (16 image tokens at the default size) instead of the resampler's 6 slots")
    for key, value in PROFILES["default"].items():
        parser.add_argument(f"--{key}", type=type(value), default=None,
                            help=f"default {value} (quick: {PROFILES['quick'][key]})")
    add_common_args(parser)
    return parser


def stage_config(settings: dict, stage: int) -> TrainConfig:
    batch_size = settings.get(f"stage{stage}_batch_size", settings["batch_size"])
    return TrainConfig(max_steps=settings[f"stage{stage}_steps"], batch_size=batch_size,
                       lr=settings[f"lr{stage}"], warmup_steps=settings["warmup_steps"], eval_every=0, ckpt_every=0)


def file_batches(examples, batch_size: int, pad_id: int, seed: int):
    """batch_fn over your own examples: random ones, a pure function of (step, micro)."""
    def batch(step, micro):
        rng = np.random.default_rng([seed, step, micro])
        return collate_images([examples[i] for i in rng.integers(0, len(examples), size=batch_size)], pad_id)
    return batch


def run_stage(model, stage: int, settings: dict, batch_fn, device, out_dir: pathlib.Path, meta: dict) -> dict:
    """One stage with the shared training loop; its figures. cpu_seconds is this process's processor
    time: on a machine shared with other jobs, about what the stage takes alone (with one thread)."""
    cpu_started = time.process_time()
    result = train(model, stage_config(settings, stage), batch_fn, device=device,
                   checkpoint_path=out_dir / f"stage{stage}_checkpoint.pt", checkpoint_meta=meta,
                   desc=f"stage {stage}", plot_path=out_dir / f"stage{stage}_loss.png")
    return {"steps": result["steps"], "train_seconds": result["train_seconds"],
            "cpu_seconds": round(time.process_time() - cpu_started, 1),
            "final_train_loss": round(result["final_train_loss"], 4),
            "trainable_params": count_trainable(model)[0]}


def see(vlm, settings: dict, seed: int, device, out_dir: pathlib.Path) -> dict:
    """Stage 0: the encoder alone learns to name, for every patch, the shape covering it, and for
    every slot the shape of its colour (pretrain_encoder.py); the heads it trains with are dropped."""
    labeller = PatchLabeller(vlm.encoder).to(device)
    patch = vlm.vision_config.patch_size
    result = run_stage(labeller, 0, settings, lambda step, micro: labelled_batch(
        settings["stage0_batch_size"], patch, seed, step), device, out_dir, meta={"stage": 0})
    labeller.eval()
    held_out = {k: v.to(device) for k, v in labelled_batch(256, patch, EVAL_SEED, 0).items()}
    accuracy = patch_accuracy(labeller, held_out)
    print("stage 0, held-out pictures: " + ", ".join(
        f"{k.replace('_', ' ')} {v:.2f}" if "pixels" in k else f"{k.replace('_', ' ')} {100 * v:.1f}% right"
        for k, v in accuracy.items()))
    return result | {"patch_accuracy": accuracy}


def align(vlm, tokenizer, settings: dict, seed: int, device, out_dir: pathlib.Path) -> dict:
    """Stage 1: the language model is frozen; the projector (and the encoder, if not frozen) learns from captions."""
    for p in vlm.lm.parameters():
        p.requires_grad_(False)
    max_tokens = vlm.config.block_size + 1
    return run_stage(vlm, 1, settings, lambda step, micro: generated_batch(
        tokenizer, {"caption": 1}, settings["batch_size"], seed, step, micro, max_tokens, vlm.n_image_tokens),
        device, out_dir, vlm_checkpoint_meta(vlm))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_args(parser).parse_args(argv)
    device = pick_device(args.device)
    seed_everything(args.seed)
    settings = resolve_profile(args, device, PROFILES)
    out_dir = pathlib.Path(args.out or step_dir(6))
    default_out = out_dir.resolve() == step_dir(6).resolve()  # out/step6 (out/quick/step6 with --quick)
    tokenizer, fingerprint = load_tokenizer_with_fingerprint(args.tokenizer)
    lm = load_model(args.checkpoint or step_dir(4) / "sft_model.pt", device, hint=MAKE_LM,
                    tokenizer_fingerprint=fingerprint)
    check_vocab(lm.config, tokenizer)
    if args.lora_r < 0:
        raise UserError(f"--lora_r {args.lora_r} must be 0 (train every weight) or a rank of at least 1")
    vision = QUICK_VISION if args.quick else VisionConfig()
    vlm = VisionLanguageModel(lm, replace(vision, slots=0) if args.patch_tokens else vision, tokenizer.image_id).to(device)
    vlm.tokenizer_fingerprint = fingerprint  # saved in its checkpoints, checked by chat.py
    max_tokens = lm.config.block_size + 1  # one token is lost to the shift
    held_out = held_out_set(settings["eval_per_kind"], fits_context(tokenizer, max_tokens, vlm.n_image_tokens))
    own = (load_image_examples(args.data, tokenizer, max_tokens, args.strict, n_image_tokens=vlm.n_image_tokens)
           if args.data else None)
    pad_id = tokenizer.eot_id
    print(f"{settings['profile']} profile on {device}: {parameter_counts(vlm)} parameters; "
          f"{vlm.n_image_tokens} image positions per picture")

    stage0 = see(vlm, settings, args.seed, device, out_dir) if settings["stage0_steps"] else None
    if stage0 and not args.tune_encoder:  # what it learned to see stays as it is, like LLaVA's CLIP
        vlm.encoder.requires_grad_(False)
    stage1 = align(vlm, tokenizer, settings, args.seed, device, out_dir)

    # Stage 2: questions; the language model learns too (all of it, or LoRA matrices).
    if args.lora_r:
        apply_lora(vlm.lm, ALL_LINEAR, r=args.lora_r, alpha=args.lora_alpha)
    else:
        for p in vlm.lm.parameters():
            p.requires_grad_(True)
    batch_fn = (file_batches(own, settings["batch_size"], pad_id, args.seed) if own else
                lambda step, micro: generated_batch(tokenizer, STAGE2_MIX, settings["batch_size"], args.seed + 1,
                                                    step, micro, max_tokens, vlm.n_image_tokens))
    stage2 = run_stage(vlm, 2, settings, batch_fn, device, out_dir, vlm_checkpoint_meta(vlm))
    if args.lora_r:
        merge_lora(vlm.lm)  # a plain model again: the saved file loads without LoRA code

    model_path = out_dir / "vlm.pt"
    save_vlm(vlm, model_path)
    started = time.time()
    vqa = vqa_accuracy(vlm, tokenizer, held_out)
    blank = vqa_accuracy(vlm, tokenizer, held_out, blank=True)
    grid = answers_grid(vlm, tokenizer, held_out, out_dir / "answers.png")
    stages = [s for s in (stage0, stage1, stage2) if s]
    metrics = {"vqa_acc": vqa, "blank_image_acc": blank, "stage0": stage0, "stage1": stage1, "stage2": stage2,
               "train_seconds": round(sum(s["train_seconds"] for s in stages), 1),
               "cpu_seconds": round(sum(s["cpu_seconds"] for s in stages), 1),
               "eval_seconds": round(time.time() - started, 1), "params": parameter_counts(vlm),
               "image_tokens": vlm.n_image_tokens, "held_out_questions": len(held_out),
               "stage2_lm": f"lora r={args.lora_r}" if args.lora_r else "all weights",
               "stage2_data": str(args.data) if args.data else "generated", "profile": settings["profile"]}
    write_metrics(6, metrics, folder=out_dir)
    print("held-out accuracy  " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in vqa.items()))
    print("blank picture      " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in blank.items()))
    print(f"saved {model_path} after {metrics['train_seconds']:.0f} s of training; answers: {grid}")
    sample = step_dir(6) / "samples" / "001.png"  # one of data.py --create_sample's pictures
    flags = ("" if default_out else f" --checkpoint {model_path}") + (f" --tokenizer {args.tokenizer}"
                                                                       if args.tokenizer else "")
    if not sample.exists():
        print(f"first: {next_command('python step6_multimodal/data.py --create_sample')} (sample pictures)")
    print(f"next: {next_command(f'python step6_multimodal/chat.py --image {sample}{flags}')}")
    return {**metrics, "model_path": model_path, "grid": grid}


if __name__ == "__main__":
    run_main(main)
