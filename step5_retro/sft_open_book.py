"""Open-book fine-tuning: teach step 4's chat model to answer from the passages in its prompt.

    python step5_retro/sft_open_book.py                 # out/step4/sft_model.pt -> out/step5/open_book_model.pt
    python step5_retro/sft_open_book.py --blend open_book:0.7,step4:0.3 --max_steps 800
    python step5_retro/sft_open_book.py --quick         # seconds: a smoke test

Step 4's model was never shown passages, and steps 3 and 4 found that a small model does not copy
from its context on its own. So it is shown thousands of questions whose answer is ONLY in the
passages: each comes from a re-drawn world (book.open_book_records), where every name has new facts,
so nothing can be memorised and the model must read. Some of these worlds are renamed to step 3's own
entities if you ask (--known_share), so the passages contradict what the model remembers; measured,
it did not make edits stick and cost ordinary facts (EXPERIMENTS.md), so the default is 0.
--edited_share does it the way edit_db.py does: step 3's own world, some of its facts rewritten in
its book (book.edited_records), none of the facts the evaluation asks about; measured, it did not
make edits stick either (EXPERIMENTS.md), so its default is 0 too.
These are blended by weight (step4_sft/blend.py, the idea
of Megatron's open_inst.sh) with step 4's own conversations, so it keeps its other skills. The
training itself is step 4's: the same template, answer-only loss, replay and loop (step4_sft/sft.py).
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common.checkpoint import checkpoint_dict, save_checkpoint
from common.cli import UserError, next_command, run_main
from common.metrics import write_metrics
from common.paths import step_dir
from common.world.world import build_world
from step1_tokenizer.bpe import load_tokenizer
from step4_sft.blend import blend, parse_blend, read_records
from step4_sft.data import write_jsonl
from step4_sft.sft import PROFILES as SFT_PROFILES, add_sft_args, file_mb, run_sft, setup
from step5_retro.book import CHUNK_SIZE, READER_K, extended_world, open_book_records
from step5_retro.eval_retrieval import asked_facts

# Step 4's fine-tuning profiles (any flag given on the command line wins), with this fine-tune's own step
# counts: the default's is chosen by measurement (EXPERIMENTS.md, "Twice the steps"), inside the 10-minute budget.
PROFILES = {"quick": SFT_PROFILES["quick"],
            "default": {**SFT_PROFILES["default"], "max_steps": 1200},
            "gpu": {**SFT_PROFILES["gpu"], "max_steps": 600, "ckpt_every": 300}}
EXAMPLES = {"quick": 200, "default": 8000}   # open-book conversations generated; the blend holds as many in all
EVAL_EXAMPLES = {"quick": 16, "default": 200}
DEFAULT_BLEND = "open_book:0.8,step4:0.2"  # chosen by measurement (EXPERIMENTS.md)
KNOWN_SHARE = 0.0  # share of re-drawn worlds renamed to step 3's entities (EXPERIMENTS.md: 0.5 hurt)
EDITED_SHARE = 0.0  # share of open-book conversations about step 3's world with edited facts (EXPERIMENTS.md)
REPLAY_ROWS = 2  # rows of step 3's text per batch (step 4 uses 4): more of each step goes to reading
MAKE_CHAT_MODEL = "python step4_sft/train_sft.py"


def database_only_names() -> set[str]:
    """The newcomers of both world sizes: re-drawn worlds never name them, so no open-book example
    says anything about an entity the evaluation asks about."""
    return {name for quick in (False, True) for name in extended_world(quick)[1]}


def resolve_source(name: str, out_dir: pathlib.Path) -> pathlib.Path:
    """'open_book' and 'step4' name the generated files; anything else is a path."""
    return {"open_book": out_dir / "open_book_train.jsonl", "step4": step_dir(4) / "sft_train.jsonl"}.get(
        name, pathlib.Path(name))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sft_args(parser, PROFILES)
    parser.add_argument("--blend", default=DEFAULT_BLEND,
                        help=f"sources and weights, path:weight,...; 'open_book' is the generated open-book set, "
                             f"'step4' is out/step4/sft_train.jsonl (default {DEFAULT_BLEND})")
    parser.add_argument("--known_share", type=float, default=KNOWN_SHARE,
                        help="share of the re-drawn worlds whose entities get the names of step 3's world, so "
                             "the passages contradict what the model remembers (any fact, the evaluation's "
                             f"included; default {KNOWN_SHARE})")
    parser.add_argument("--edited_share", type=float, default=EDITED_SHARE,
                        help="share of the open-book conversations about step 3's own world with some of its "
                             "facts edited in the book, as edit_db.py edits them (never the facts "
                             f"eval_retrieval.py asks about; default {EDITED_SHARE})")
    parser.add_argument("--examples", type=int, default=None,
                        help=f"open-book conversations to generate (default {EXAMPLES['default']}, "
                             f"quick {EXAMPLES['quick']}); the blend holds as many conversations in all")
    args = parser.parse_args(argv)
    profile = "quick" if args.quick else "default"
    out_dir = pathlib.Path(args.out or step_dir(5))
    args.out = str(out_dir)
    args.checkpoint = args.checkpoint or str(step_dir(4) / "sft_model.pt")
    if not pathlib.Path(args.checkpoint).exists():
        raise UserError(f"{args.checkpoint}: no chat model to start from; run {next_command(MAKE_CHAT_MODEL)}")
    n_examples = args.examples or EXAMPLES[profile]
    if n_examples < 1:
        raise UserError(f"--examples must be at least 1, not {n_examples}")

    tokenizer = load_tokenizer(args.tokenizer)
    avoid = database_only_names()
    for flag in ("known_share", "edited_share"):
        if not 0 <= getattr(args, flag) <= 1:
            raise UserError(f"--{flag} must be between 0 and 1, not {getattr(args, flag)}")
    known = build_world(0, profile) if args.known_share or args.edited_share else None  # step 3's world
    shape = dict(chunk_size=CHUNK_SIZE[profile], k=READER_K[profile], avoid=avoid,  # as build_db.py and ask.py
                 known=known, known_share=args.known_share, edited_share=args.edited_share,
                 held_out=asked_facts(profile) if args.edited_share else ())
    write_jsonl(open_book_records(tokenizer, n_examples, seed=args.seed, **shape), out_dir / "open_book_train.jsonl")
    eval_path = out_dir / "open_book_eval.jsonl"  # other worlds: a validation loss on unseen facts
    # (re-drawn worlds only: step 3's world has too few facts for edited ones the training never saw)
    write_jsonl(open_book_records(tokenizer, EVAL_EXAMPLES[profile], seed=args.seed + 1,
                                  **{**shape, "edited_share": 0.0}), eval_path)
    sources = [(read_records(resolve_source(name, out_dir)), weight) for name, weight in parse_blend(args.blend)]
    blend_path = out_dir / "open_book_blend.jsonl"
    write_jsonl(blend(sources, n_examples, args.seed), blend_path)
    args.data, args.eval_data = args.data or str(blend_path), args.eval_data or str(eval_path)
    args.replay_rows = REPLAY_ROWS if args.replay_rows is None else args.replay_rows

    run = setup(args, PROFILES)
    model = run["model"]
    print(f"open-book fine-tuning of {args.checkpoint} ({run['settings']['profile']} profile): blend {args.blend}")
    result = run_sft(model, run, args.seed, args.resume, "open_book_sft")
    model_path = out_dir / "open_book_model.pt"
    save_checkpoint(checkpoint_dict(model), model_path)
    metrics = {"train_seconds": result["train_seconds"], "steps": result["steps"], "blend": args.blend,
               "known_share": args.known_share, "edited_share": args.edited_share,
               "open_book_examples": n_examples, "final_train_loss": round(result["final_train_loss"], 4),
               "val_loss": None if result["val_loss"] is None else round(result["val_loss"], 4),
               "file_mb": file_mb(model_path), "profile": run["settings"]["profile"]}
    write_metrics(5, metrics, section="open_book_sft", folder=out_dir)
    print(f"saved {model_path} after {result['train_seconds']:.0f} s; validation loss on open-book answers "
          f"{metrics['val_loss']}")
    print(f"next: {next_command('python step5_retro/eval_retrieval.py')}")
    return {**result, **metrics}


if __name__ == "__main__":
    run_main(main)
