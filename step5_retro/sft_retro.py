"""Instruction-tune a Retro model: questions answered from the neighbours retrieved for them (Megatron-LM's
tools/retro/sft/sft_retro.py, in small).

    python step5_retro/sft_retro.py            # out/step5/retro_from_scratch.pt -> out/step5/retro_sft.pt
    python step5_retro/sft_retro.py --checkpoint out/step5/retro_retrofit.pt --out out/step5/retrofit_sft
    python step5_retro/sft_retro.py --quick    # seconds: a smoke test

Each example is one question about one fact of a re-drawn world (build_world(seed, "quick"): new names,
new values), in step 4's chat template with step 4's answer-only mask (retro_qa.py). Its neighbours are
the question's k best passages in that world's library, and its prompt is left-padded so that the answer
starts on a chunk boundary (RETRO's QA left-padding), where CCA lets the answer read them. No value can be
memorised: the only way to the answer is the neighbours. Questions whose neighbours do not state their
answer are left out of training. Every weight trains (decoder, encoder, CCA), as in InstructRetro; the loss
is the model's own over the answer tokens, in the shared training loop (common/train.py).

Validation: questions about worlds that neither pretraining nor this run trained on, read with their
neighbours, with retrieval off and with random chunks of another world's library.
Writes out/step5/retro_sft.pt, retro_sft_loss.png and the "retro_sft" section of out/step5/metrics.json.
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common.checkpoint import check_vocab, load_checkpoint, save_checkpoint
from common.cli import add_common_args, next_command, run_main
from common.device import pick_device
from common.metrics import write_metrics
from common.paths import step_dir
from common.seed import seed_everything
from common.train import resolve_profile
from step1_tokenizer.bpe import load_tokenizer
from step2_model.inspect_model import count_trainable
from step5_retro.retro_data import VAL_SEED0
from step5_retro.retro_fit import NEIGHBOUR_MODES, fit, measure
from step5_retro.retro_model import check_database, check_shape, load_retro, retro_checkpoint
from step5_retro.retro_qa import MAKE_SFT_RETRO, QA_SEED0, qa_split

# Any flag given on the command line wins over its profile. A fine-tune moves a trained model a little:
# half pretraining's learning rate. The step count is chosen by measurement, inside the 10-minute budget
# (EXPERIMENTS.md, "Instruction tuning Retro").
PROFILES = {
    "quick": dict(max_steps=30, batch_size=16, lr=1e-3, warmup_steps=5, eval_every=0, ckpt_every=0,
                  train_worlds=8, val_worlds=2),
    "default": dict(max_steps=300, batch_size=32, lr=1e-3, warmup_steps=30, eval_every=100, ckpt_every=100,
                    train_worlds=300, val_worlds=20),
    "gpu": dict(max_steps=2000, batch_size=64, lr=5e-4, warmup_steps=100, eval_every=250, ckpt_every=500,
                train_worlds=2000, val_worlds=50),
}
EVAL_ROWS = {"quick": 32, "default": 400, "gpu": 1000}  # validation questions read for each figure


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help="the Retro model to tune (default out/step5/retro_from_scratch.pt)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--out", default=None, help="output folder (default out/step5)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run exactly")
    parser.add_argument("--chunk_size", type=int, default=None,
                        help="the chunk size to tune for (default: the checkpoint's; another one is refused)")
    parser.add_argument("--k", type=int, default=None,
                        help="neighbours per chunk (default: the checkpoint's; another number is refused)")
    for key, value in PROFILES["default"].items():
        parser.add_argument(f"--{key}", type=type(value), default=None,
                            help=f"default {value} (quick: {PROFILES['quick'][key]})")
    add_common_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    seed_everything(args.seed)
    settings = resolve_profile(args, device, PROFILES)
    out_dir = pathlib.Path(args.out or step_dir(5))
    checkpoint = pathlib.Path(args.checkpoint or step_dir(5) / "retro_from_scratch.pt")
    model, database = load_retro(checkpoint, device)  # a plain model's checkpoint is refused here
    check_shape(model.retro, str(checkpoint), args.chunk_size, args.k)
    tokenizer = load_tokenizer(args.tokenizer)
    check_vocab(model.config, tokenizer)
    retro = model.retro

    shape = dict(tokenizer=tokenizer, chunk_size=retro.chunk_size, k=retro.k, block_size=model.config.block_size)
    train_split, train_items = qa_split(range(QA_SEED0, QA_SEED0 + settings["train_worlds"]), **shape)
    val, _ = qa_split(range(VAL_SEED0, VAL_SEED0 + settings["val_worlds"]), **shape)
    check_database(database, train_split.meta, f"{checkpoint} and this tokenizer")  # same tokenizer as pretraining
    checkpoint_path = out_dir / "retro_sft_checkpoint.pt"
    if args.resume and checkpoint_path.exists():
        check_database(load_checkpoint(checkpoint_path).get("database", {}), train_split.meta, str(checkpoint_path),
                       fix=MAKE_SFT_RETRO)
    n_train, _ = count_trainable(model)
    print(f"instruction tuning {checkpoint} ({settings['profile']} profile on {device}): {len(train_split.rows):,} "
          f"questions from {settings['train_worlds']} worlds, rows of {train_split.rows.shape[1] - 1} tokens, "
          f"{len(val.rows)} validation questions; {n_train:,} parameters train")

    meta = {"config": model.config.to_dict(), "retro": retro.to_dict(), "database": train_split.meta}
    result = fit(model, train_split, val, settings, args.seed, "retro_sft", out_dir, device, args.resume, meta,
                 eval_rows=EVAL_ROWS[settings["profile"]] // 4, plot_path=out_dir / "retro_sft_loss.png")
    model_path = out_dir / "retro_sft.pt"
    save_checkpoint(retro_checkpoint(model, train_split.meta, base=str(checkpoint)), model_path)

    rows = EVAL_ROWS[settings["profile"]]
    figures = {mode: measure(model, val, mode, rows) for mode in NEIGHBOUR_MODES}
    metrics = {"profile": settings["profile"], "settings": {k: settings[k] for k in sorted(settings) if k != "profile"},
               "base": str(checkpoint), "device": str(device), "train_seconds": result["train_seconds"],
               "steps": result["steps"], "train_questions": len(train_items), "val_questions": len(val.rows),
               "final_train_loss": round(result["final_train_loss"], 4),
               **{f"val_answer_loss_{mode}": figures[mode]["loss"] for mode in NEIGHBOUR_MODES},
               **{f"val_answer_token_acc_{mode}": figures[mode]["fact_acc"] for mode in NEIGHBOUR_MODES}}
    write_metrics(5, metrics, section="retro_sft", folder=out_dir)
    print(f"{'validation questions (worlds never trained on)':48s} {'answer loss':>11s} {'token acc':>9s}")
    for mode, label in zip(NEIGHBOUR_MODES, ("its neighbours", "retrieval off", "random neighbours")):
        print(f"{'Retro SFT, ' + label:48s} {figures[mode]['loss']:11.4f} {figures[mode]['fact_acc']:9.1%}")
    print(f"saved {model_path} after {result['train_seconds']:.0f} s of training")
    print(f"next: {next_command('python step5_retro/eval_retrieval.py')}")
    return {**result, **metrics, "model": model, "val": val}


if __name__ == "__main__":
    run_main(main)
