"""Build the retrieval database: every entity's fact sheet, chunked, embedded and indexed with faiss.

    python step5_retro/build_db.py                          # out/step5/db: tfidf embedder, exact index
    python step5_retro/build_db.py --embedder model         # the frozen step-3 model embeds instead
    python step5_retro/build_db.py --index IVF16,Flat --nprobe 4 --out out/step5/db_ivf
    python step5_retro/build_db.py --quick                  # the small world, into out/quick/step5/db

The documents are the fact sheets (common/world/world.py, documents_about) of step 3's world AND of
newcomers no training text ever named (world.add_newcomers): their facts are only in here.
The work is in database.py; this script chooses the documents and prints what it built.
"""
import argparse
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common.cli import add_common_args, next_command, run_main
from common.metrics import write_metrics
from common.paths import step_dir
from step1_tokenizer.bpe import load_tokenizer
from step5_retro.book import CHUNK_SIZE, READER_K, book_documents, extended_world, retrieve_passages
from step5_retro.database import EMBEDDERS, build_database


def default_db_dir():
    return step_dir(5) / "db"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="database folder (default out/step5/db)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--chunk_size", type=int, default=None,
                        help=f"tokens per chunk (default {CHUNK_SIZE['default']}, quick {CHUNK_SIZE['quick']}; "
                             "RETRO uses 64)")
    parser.add_argument("--embedder", default="tfidf", choices=EMBEDDERS,
                        help="tfidf: bag of tokens weighted by rarity; model: the frozen step-3 model's mean "
                             "hidden state (default tfidf)")
    parser.add_argument("--model", default=None, help="the model embedder's checkpoint (default out/step3/model.pt)")
    parser.add_argument("--index", default="Flat", help='faiss factory string, e.g. "IVF16,Flat" or "IVF16,PQ8" '
                                                        "(default Flat: exact search)")
    parser.add_argument("--nprobe", type=int, default=8, help="IVF lists visited per search (default 8)")
    parser.add_argument("--k", type=int, default=2, help="neighbours per chunk in the neighbour table (default 2)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    out_dir = pathlib.Path(args.out or default_db_dir())
    args.chunk_size = args.chunk_size or CHUNK_SIZE["quick" if args.quick else "default"]
    tokenizer = load_tokenizer(args.tokenizer)
    world, newcomers = extended_world(quick=args.quick)
    titles, documents = book_documents(world)
    started = time.time()
    db = build_database(documents, tokenizer, out_dir, chunk_size=args.chunk_size, embedder=args.embedder,
                        index=args.index, k=args.k, nprobe=args.nprobe, titles=titles,
                        model_checkpoint=args.model or step_dir(3) / "model.pt", seed=args.seed, progress=True,
                        extra_meta={"world": {"seed": world.seed, "size": world.size, "newcomers": newcomers,
                                              "overrides": []}})
    seconds = time.time() - started
    print(f"{len(documents)} documents ({len(newcomers)} about newcomers no training text names) -> "
          f"{len(db)} chunks of {args.chunk_size} tokens; {args.embedder} embeddings, index {args.index!r}, "
          f"{args.k} neighbours each; {seconds:.1f} s -> {out_dir}")
    question = f"Where does {newcomers[0]} live?"
    ids, scores, passages = retrieve_passages(db, question, READER_K["quick" if args.quick else "default"])
    print(f"\nexample: {question}")
    for i, score, passage in zip(ids, scores, passages):
        print(f"  chunk {i} (document {db.chunk_doc[i]}: {db.titles[db.chunk_doc[i]]}, score {score:.3f}): "
              f"{passage!r}")
    if out_dir == default_db_dir():
        write_metrics(5, {"seconds": round(seconds, 2), "n_chunks": len(db), "n_documents": len(documents),
                          "chunk_size": args.chunk_size, "embedder": args.embedder, "index": args.index},
                      section="build_db")
    print(f"next: {next_command('python step5_retro/ask.py --show_neighbours')}")
    return db


if __name__ == "__main__":
    run_main(main)
