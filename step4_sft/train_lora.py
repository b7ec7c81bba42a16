"""LoRA fine-tuning: the same SFT, but only small low-rank matrices train.

    python step4_sft/train_lora.py --lora_r 8                       # q and v projections (the LoRA paper's choice)
    python step4_sft/train_lora.py --lora_r 16 --target_modules all-linear
    python step4_sft/train_lora.py --lora_r 8 --target_modules q_proj,v_proj     # PEFT's names work too
    python step4_sft/train_lora.py --quick

The pretrained weights stay frozen; every targeted nn.Linear gets a LoRA update
(see lora.py). Only the adapter is saved (out/step4/lora_adapter.pt): a small
fraction of the whole model's file. chat.py and eval_sft.py load the base
model, put the adapter on and merge it, so answering costs nothing extra.
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common.cli import UserError, next_command, run_main
from common.metrics import write_metrics
from step2_model.inspect_model import count_trainable
from step4_sft.lora import apply_lora, parse_targets, save_adapter
from step4_sft.sft import LORA_PROFILES as PROFILES, add_sft_args, file_mb, run_sft, setup


def main(argv=None, probe=None):
    """probe: see sft.run_sft (seed_table.py --lora passes one)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora_r", type=int, default=8, help="rank r of the update B A (default 8)")
    parser.add_argument("--lora_alpha", type=float, default=16.0,
                        help="the update is scaled by alpha / r (default 16)")
    # 0 by default: on this small model LoRA underfits (validation loss close to the training loss),
    # so dropout has nothing to guard against (step4_sft/EXPERIMENTS.md).
    parser.add_argument("--lora_dropout", type=float, default=0.0,
                        help="dropout on the LoRA branch's input while training (default 0)")
    parser.add_argument("--target_modules", default="wq,wv",
                        help="layers to adapt: comma-separated names among wq,wk,wv,wo,w_gate,w_up,w_down "
                             "(or PEFT's q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj), "
                             "or all-linear (default wq,wv)")
    parser.add_argument("--no_token_rows", action="store_true",
                        help="do not train the embedding rows of <|im_start|> and <|im_end|> (pure LoRA; "
                             "EXPERIMENTS.md measures what the two rows add)")
    parser.add_argument("--weight_decay", type=float, default=0.0,
                        help="AdamW weight decay on the LoRA matrices and token rows (default 0; what it does "
                             "at a larger --lr: EXPERIMENTS.md, 'Why a larger learning rate fails')")
    add_sft_args(parser, PROFILES)
    # No replay by default: it protects weights that fine-tuning changes, and LoRA leaves every
    # base weight frozen; with it, LoRA's small capacity goes to the world text instead of the
    # answers (step4_sft/EXPERIMENTS.md).
    parser.set_defaults(replay_rows=0)
    args = parser.parse_args(argv)
    if args.weight_decay < 0:
        raise UserError(f"--weight_decay must be 0 or more, not {args.weight_decay:g}")
    targets = parse_targets(args.target_modules)
    run = setup(args, PROFILES)
    model, dist = run["model"], run["dist"]
    token_ids = [] if args.no_token_rows else [run["tokenizer"].im_start_id, run["tokenizer"].im_end_id]
    wrapped = apply_lora(model, targets, args.lora_r, args.lora_alpha, args.lora_dropout, token_ids=token_ids)
    trainable, total = count_trainable(model)
    if dist.is_main:
        rows = f" + {len(token_ids)} token rows" if token_ids else ""
        print(f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} on {len(wrapped)} layers ({','.join(targets)}){rows}: "
              f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.2f}")
    result = run_sft(model, run, args.seed, args.resume, "lora", weight_decay=args.weight_decay, probe=probe)
    if not dist.is_main:
        return result
    adapter_path = run["out_dir"] / "lora_adapter.pt"
    save_adapter(model, adapter_path)
    metrics = {"trainable_params": trainable, "total_params": total,
               "trainable_percent": round(100 * trainable / total, 3), "lora_r": args.lora_r,
               "lora_alpha": args.lora_alpha, "target_modules": list(targets), "token_rows": len(token_ids),
               "train_seconds": result["train_seconds"], "peak_memory_mb": result["peak_memory_mb"],
               "tokens_per_sec": result["tokens_per_sec"], "steps": result["steps"],
               "final_train_loss": round(result["final_train_loss"], 4),
               "val_loss": None if result["val_loss"] is None else round(result["val_loss"], 4),
               "file_mb": file_mb(adapter_path), "profile": run["settings"]["profile"]}
    write_metrics(4, metrics, section="lora", folder=run["out_dir"])
    print(f"saved {adapter_path} ({metrics['file_mb']} MB) after {result['train_seconds']:.0f} s; "
          f"loss: train {metrics['final_train_loss']}{' (answers + replayed text)' if run['replay_rows'] else ''}, "
          f"validation {metrics['val_loss']} (answers only)")
    print(f"next: {next_command(f'python step4_sft/chat.py --lora {adapter_path}')}")
    return {**result, **metrics}


if __name__ == "__main__":
    run_main(main)
