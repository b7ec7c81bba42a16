"""Ask the open book: a question -> its nearest chunks in the database -> a chat model reads them and answers.

    python step5_retro/ask.py "Where does Halra live?" --show_neighbours
    python step5_retro/ask.py "Where does Halra live?" --closed_book        # the same model, no passages
    python step5_retro/ask.py "Where does Halra live?" --checkpoint out/step4/sft_model.pt   # step 4's model

The passages (each neighbour chunk with its continuation, as RETRO hands them over) go into the user
turn before the question; the model default is the open-book fine-tuned one (sft_open_book.py),
else step 4's chat model.
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common.cli import UserError, add_common_args, run_main
from common.device import pick_device
from common.paths import step_dir
from step1_tokenizer.bpe import load_tokenizer_with_fingerprint
from step4_sft.chat import load_chat_model
from step5_retro.book import READER_K, answer, retrieve_passages
from step5_retro.database import load_database

OPEN_BOOK_MODEL = "open_book_model.pt"


def default_reader():
    """The open-book fine-tuned model if sft_open_book.py has made it, else step 4's chat model."""
    tuned = step_dir(5) / OPEN_BOOK_MODEL
    return tuned if tuned.exists() else step_dir(4) / "sft_model.pt"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default=None, help="the question (default: one about a newcomer)")
    parser.add_argument("--db", default=None, help="database folder (default out/step5/db)")
    parser.add_argument("--checkpoint", default=None,
                        help="the reader (default out/step5/open_book_model.pt, else out/step4/sft_model.pt)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--k", type=int, default=None, help="passages retrieved (default 2, quick 1)")
    parser.add_argument("--show_neighbours", action="store_true", help="print each passage, its document and score")
    parser.add_argument("--closed_book", action="store_true", help="answer without passages")
    add_common_args(parser)
    args = parser.parse_args(argv)
    args.k = args.k or READER_K["quick" if args.quick else "default"]
    tokenizer, fingerprint = load_tokenizer_with_fingerprint(args.tokenizer)
    db = load_database(args.db or step_dir(5) / "db", tokenizer)
    question = args.question or f"Where does {db.meta.get('world', {}).get('newcomers', ['Halra'])[0]} live?"
    if not question.strip():
        raise UserError("the question is empty")
    checkpoint = args.checkpoint or default_reader()
    model = load_chat_model(checkpoint, device=pick_device(args.device), tokenizer_fingerprint=fingerprint)
    passages = None
    if not args.closed_book:
        ids, scores, passages = retrieve_passages(db, question, args.k)
        if args.show_neighbours:
            for rank, (i, score, passage) in enumerate(zip(ids, scores, passages), start=1):
                doc = int(db.chunk_doc[i])
                print(f"[{rank}] chunk {i} of document {doc} ({db.titles[doc]}), score {score:.3f}:\n    {passage!r}")
    reply = answer(model, tokenizer, question, passages)
    print(f"Q: {question}\nA: {reply}    ({pathlib.Path(checkpoint).name}, "
          f"{'closed book' if passages is None else f'{len(passages)} passages'})")
    return {"question": question, "answer": reply, "passages": passages}


if __name__ == "__main__":
    run_main(main)
