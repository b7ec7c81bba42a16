"""Supervised fine-tuning (SFT): teach the pretrained model to answer, on every weight.

    python step4_sft/train_sft.py                                  # out/step3/model.pt -> out/step4/sft_model.pt
    python step4_sft/train_sft.py --data my_chats.jsonl --max_steps 2000   # -> out/step4/my_chats/sft_model.pt
    python step4_sft/train_sft.py --epochs 1                       # one pass over the conversations, shuffled
    python step4_sft/train_sft.py --data a.jsonl:0.7,b.jsonl:0.3   # a blend: 70 % of the conversations from a
    python step4_sft/train_sft.py --quick                          # seconds: a smoke test

Pretraining and SFT use the same model, the same next-token loss and the same
training loop (common/train.py). Only the data and the loss mask differ: the
model reads whole conversations but is scored only on the assistant's tokens,
so it learns to WRITE answers, not to predict what users type.

Each batch also carries a few rows of step 3's world text ("replay"), so that
fine-tuning does not erase what pretraining taught. The pieces train_lora.py
shares (flags, setup, loss, the training run) are in sft.py.
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common.checkpoint import checkpoint_dict, save_checkpoint
from common.cli import next_command, run_main
from common.metrics import write_metrics
from step2_model.inspect_model import count_trainable
from step4_sft.sft import PROFILES, add_sft_args, file_mb, run_sft, setup


def main(argv=None, probe=None):
    """probe: see sft.run_sft (seed_table.py passes one)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sft_args(parser, PROFILES)
    args = parser.parse_args(argv)
    run = setup(args, PROFILES)
    model, dist = run["model"], run["dist"]
    n_params = count_trainable(model)[1]
    if dist.is_main:
        print(f"full fine-tuning ({run['settings']['profile']} profile on {run['device']}): "
              f"all {n_params:,} parameters train")
    result = run_sft(model, run, args.seed, args.resume, "sft", probe=probe)
    if not dist.is_main:
        return result
    model_path = run["out_dir"] / "sft_model.pt"
    save_checkpoint(checkpoint_dict(model, tokenizer_fingerprint=run["tokenizer_fingerprint"]), model_path)
    metrics = {"trainable_params": n_params, "total_params": n_params, "train_seconds": result["train_seconds"],
               "peak_memory_mb": result["peak_memory_mb"], "tokens_per_sec": result["tokens_per_sec"],
               "steps": result["steps"], "final_train_loss": round(result["final_train_loss"], 4),
               "val_loss": None if result["val_loss"] is None else round(result["val_loss"], 4),
               "file_mb": file_mb(model_path), "profile": run["settings"]["profile"]}
    write_metrics(4, metrics, section="full_sft", folder=run["out_dir"])
    print(f"saved {model_path} ({metrics['file_mb']} MB) after {result['train_seconds']:.0f} s; "
          f"loss: train {metrics['final_train_loss']}{' (answers + replayed text)' if run['replay_rows'] else ''}, "
          f"validation {metrics['val_loss']} (answers only)")
    print(f"next: {next_command(f'python step4_sft/chat.py --checkpoint {model_path}')}")
    return {**result, **metrics}


if __name__ == "__main__":
    run_main(main)
