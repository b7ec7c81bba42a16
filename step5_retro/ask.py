"""Ask the open book: a question -> its nearest chunks in the database -> a chat model reads them and answers.

    python step5_retro/ask.py "Where does Halra live?" --show_neighbours
    python step5_retro/ask.py "Where does Halra live?" --closed_book        # the same model, no passages
    python step5_retro/ask.py "Where does Halra live?" --free               # may write words the book lacks
    python step5_retro/ask.py "Where does Halra live?" --checkpoint out/step4/sft_model.pt   # step 4's model
    python step5_retro/ask.py "Where does Halra live?" --retro --show_neighbours --show_attention

The passages (each neighbour chunk with its continuation, as RETRO hands them over) go into the user
turn before the question; the model default is the open-book fine-tuned one (sft_open_book.py),
else step 4's chat model. It writes only the book's words: tokens of the passages, of the question
and of the answers' template (book.book_words); --free lifts that rule.

--retro: the instruction-tuned Retro model (sft_retro.py) answers instead. The passages do not enter its
prompt: they are the question's neighbours, read through chunked cross-attention, from the database's
fact sheets cut into the model's own chunk size (retro_qa.py). --show_attention prints, for each token
of the answer, the neighbour token its CCA layers read most.
"""
import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common.checkpoint import check_vocab, load_checkpoint
from common.cli import UserError, add_common_args, run_main
from common.device import pick_device
from common.paths import step_dir
from step1_tokenizer.bpe import load_tokenizer_with_fingerprint
from step4_sft.chat import MAKE_SFT, load_chat_model
from step4_sft.chat_template import decode_reply
from step5_retro.book import ANSWER_TOKENS, READER_K, answer, retrieve_passages
from step5_retro.database import load_database
from step5_retro.retro_data import passages as neighbour_tokens
from step5_retro.retro_model import check_database, check_shape, load_retro
from step5_retro.retro_qa import (MAKE_SFT_RETRO, answer_attention, library_for, qa_prompt, question_neighbours,
                                  retro_generate)

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
    parser.add_argument("--k", type=int, default=None,
                        help="passages retrieved (default 2, quick 1; with --retro the model's own k, no other)")
    parser.add_argument("--show_neighbours", action="store_true", help="print each passage, its document and score")
    parser.add_argument("--closed_book", action="store_true", help="answer without passages")
    parser.add_argument("--free", action="store_true",
                        help="let the reader write any word (default: only words of the passages, the question "
                             "and the answers' template, so a value the book does not hold cannot be written)")
    parser.add_argument("--retro", action="store_true",
                        help="answer with the instruction-tuned Retro model (default out/step5/retro_sft.pt), "
                             "which reads the neighbours through chunked cross-attention")
    parser.add_argument("--show_attention", action="store_true",
                        help="with --retro: for each answer token, the neighbour token its CCA layers read most")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.show_attention and not args.retro:
        raise UserError("--show_attention shows Retro's cross-attention: add --retro")
    tokenizer, fingerprint = load_tokenizer_with_fingerprint(args.tokenizer)
    db = load_database(args.db or step_dir(5) / "db", tokenizer)
    question = args.question or f"Where does {db.meta.get('world', {}).get('newcomers', ['Halra'])[0]} live?"
    if not question.strip():
        raise UserError("the question is empty")
    if args.retro:
        return ask_retro(args, tokenizer, fingerprint, db, question)
    args.k = args.k or READER_K["quick" if args.quick else "default"]
    checkpoint = args.checkpoint or default_reader()
    if "retro" in load_checkpoint(checkpoint, hint=MAKE_SFT):
        raise UserError(f"{checkpoint}: a Retro checkpoint; ask it with --retro")
    model = load_chat_model(checkpoint, device=pick_device(args.device), tokenizer_fingerprint=fingerprint)
    passages = None
    if not args.closed_book:
        ids, scores, passages = retrieve_passages(db, question, args.k)
        if args.show_neighbours:
            for rank, (i, score, passage) in enumerate(zip(ids, scores, passages), start=1):
                show_neighbour(db, rank, i, score, passage)
    reply = answer(model, tokenizer, question, passages, free=args.free)
    print(f"Q: {question}\nA: {reply}    ({pathlib.Path(checkpoint).name}, "
          f"{'closed book' if passages is None else f'{len(passages)} passages'}"
          f"{', any word' if args.free and passages else ''})")
    return {"question": question, "answer": reply, "passages": passages}


def show_neighbour(db, rank: int, chunk: int, score: float, passage: str) -> None:
    doc = int(db.chunk_doc[chunk])
    print(f"[{rank}] chunk {chunk} of document {doc} ({db.titles[doc]}), score {score:.3f}:\n    {passage!r}")


def ask_retro(args, tokenizer, fingerprint, db, question) -> dict:
    """The Retro model answers: the question's neighbours from the database's fact sheets, cut into the
    model's chunk size, read through CCA; the prompt left-padded so the answer starts on a chunk boundary."""
    checkpoint = args.checkpoint or step_dir(5) / "retro_sft.pt"
    model, database = load_retro(checkpoint, pick_device(args.device), hint=MAKE_SFT_RETRO)
    check_shape(model.retro, str(checkpoint), k=args.k)
    check_vocab(model.config, tokenizer)
    check_database(database, {"tokenizer_sha": fingerprint}, str(checkpoint), fix=MAKE_SFT_RETRO)
    m, k = model.retro.chunk_size, model.retro.k
    library = library_for(db, tokenizer, model.retro)
    if args.closed_book:
        neighbours, shown = None, []
    else:
        chunk_ids, scores = question_neighbours(library, [question], k)
        neighbours = neighbour_tokens(library, chunk_ids[0], tokenizer.eot_id)  # (k, 2m) token ids
        shown = [library.passage(i) for i in chunk_ids[0]]
        if args.show_neighbours:
            for rank, (i, score, passage) in enumerate(zip(chunk_ids[0], scores[0], shown), start=1):
                show_neighbour(library, rank, int(i), float(score), passage)
    prompt = qa_prompt(tokenizer, question, m)
    new = retro_generate(model, prompt, neighbours, ANSWER_TOKENS, tokenizer.im_end_id)
    reply = decode_reply(tokenizer, new)
    print(f"Q: {question}\nA: {reply}    ({pathlib.Path(checkpoint).name}, "
          f"{'retrieval off' if neighbours is None else f'{k} neighbours read through CCA'})")
    weights = None
    if args.show_attention and neighbours is not None and new:
        weights = answer_attention(model, prompt + new, len(prompt), neighbours)
        print_attention(tokenizer, weights, new, neighbours)
    return {"question": question, "answer": reply, "passages": shown, "attention": weights}


def print_attention(tokenizer, weights, answer_ids, neighbours) -> None:
    """For each answer token, the neighbour token read most, its share of the attention and a bar."""
    r = neighbours.shape[-1]
    print("answer token        reads most in the neighbours (CCA, mean of its layers and heads)")
    for token, row in zip(answer_ids, weights):
        best = int(row.argmax())
        read = tokenizer.decode([int(neighbours[best // r, best % r])])
        print(f"  {tokenizer.decode([token])!r:16s}  [{best // r + 1}] {read!r:14s} {row[best]:.2f} "
              f"{'#' * round(20 * float(row[best]))}")


if __name__ == "__main__":
    run_main(main)
