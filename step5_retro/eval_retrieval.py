"""Measure the open book: retrieval recall, answers closed book / with passages / after open-book SFT,
and knowledge edited in the database.

    python step5_retro/eval_retrieval.py            # out/step5/metrics.json and out/step5/retrieval_qa.png
    python step5_retro/eval_retrieval.py --retro_only   # only the Retro rows (part 2)
    python step5_retro/eval_retrieval.py --quick

Questions come in two sets: database-only facts (the newcomers: no training text names them) and
ordinary facts (step 3's world, which the models read in pretraining). Three readers answer each:
step 4's chat model closed book, the same model with the retrieved passages in its prompt, and the
open-book fine-tuned model (sft_open_book.py) with the passages. A reader with passages writes only
the book's words (book.book_words); the open-book model is asked once more free to write any word
(the *_free rows), to show what that rule adds. Then some ordinary facts are
rewritten in a copy of the database (book.edit_book; the database on disk is left as it is) and
everything is asked again: edited facts should get the new value, unrelated facts should not move.
Recall@k: the share of questions for which one of the k passages states the asked fact; measured
for both embedders (the other one's database is built in memory from the same documents).

Scores, as SQuAD's: exact match and token F1 of the short answer, the value the question asks for
("Evergate" in "Halra lives in Evergate."; book.answer_value takes it out of the reply's wording),
after SQuAD's normalisation. qa_sentence_em_* is stricter: the whole reply equals the whole answer
sentence (step 4's scoring), so a misspelt name in front of the right value counts as wrong.

The Retro rows (part 2), on re-drawn worlds that no run trained on (each with its own library, as
in training): perplexity of the Retro model with its neighbours and with retrieval off, and of its
plain twin (train_retro.py's checkpoints); the instruction-tuned Retro model's answers (sft_retro.py)
with the question's neighbours, with retrieval off and with random chunks of another world; and facts
edited in a world's library (its fact sheets rewritten and re-embedded, the question retrieved again,
no weight changed). A missing checkpoint skips its rows with the command that makes it.
"""
import argparse
import pathlib
import random
import sys
import time
from collections import Counter

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm import tqdm

from common.checkpoint import check_vocab
from common.cli import UserError, add_common_args, next_command, run_main
from common.device import pick_device
from common.metrics import write_metrics
from common.paths import step_dir
from common.plot import new_figure, save_figure
from common.world.world import apply_overrides, ask, build_world, documents_about
from step1_tokenizer.bpe import load_tokenizer_with_fingerprint
from step4_sft.chat import load_chat_model
from step4_sft.data import write_jsonl
from step5_retro.book import READER_K, answer, answer_value, edit_book, extended_world, holds_fact
from step5_retro.database import build_database, load_database, tokenizer_sha
from step5_retro.retro_data import VAL_SEED0, passages, retro_split, world_library
from step5_retro.retro_fit import NEIGHBOUR_MODES, measure
from step5_retro.retro_model import MAKE_RETRO, check_database, load_plain, load_retro
from step5_retro.retro_qa import MAKE_SFT_RETRO, library_for, question_neighbours, retro_answer, world_questions
from step5_retro.scoring import exact_match, token_f1

ORDINARY = {"quick": 12, "default": 60}   # ordinary facts asked
EDITS = {"quick": 4, "default": 20}       # ordinary facts rewritten in the database
EXTRA_TOKENS = 8                          # a reply this much longer than the expected one is wrong anyway
# The Retro rows: train_retro.py's validation worlds (none trained on) and rows, questions about them, edits.
RETRO_VAL_WORLDS = {"quick": 3, "default": 20}
RETRO_ROWS = {"quick": 24, "default": 240}
RETRO_QUESTIONS = {"quick": 12, "default": 200}
RETRO_EDITS = {"quick": 4, "default": 40}


def questions(world, newcomers: list[str], n_ordinary: int, n_edits: int, seed: int):
    """(database-only items, ordinary items, edit items): each item a dict with the fact, question and
    answer; the edited facts are ordinary facts apart from the ordinary set, each given a new value
    of the same kind drawn from the training world's own values."""
    rng = random.Random(seed)
    new_facts = [f for f in world.facts if f.entity in newcomers]
    old_facts = rng.sample([f for f in world.facts if f.entity not in newcomers and f.value not in newcomers],
                           n_ordinary + n_edits)
    values = {}
    for f in world.facts:
        if f.entity not in newcomers and f.value not in newcomers:
            values.setdefault(f.relation, set()).add(f.value)

    def item(fact):
        question, gold = ask(fact, rng)
        return {"fact": fact, "question": question, "answer": gold}
    edits = []
    for fact in old_facts[n_ordinary:]:
        new_value = rng.choice(sorted(values[fact.relation] - {fact.value, fact.entity}))
        edits.append({**item(type(fact)(fact.entity, fact.relation, new_value)), "old": fact.value})
    return [item(f) for f in new_facts], [item(f) for f in old_facts[:n_ordinary]], edits


def asked_facts(profile: str, seed: int = 0) -> set[tuple[str, str]]:
    """(entity, relation) of every ordinary and edited fact this evaluation asks about (with its default
    seed): the open-book fine-tune never edits nor asks them (sft_open_book.py --edited_share)."""
    world, newcomers = extended_world(quick=profile == "quick")
    _, old_items, edit_items = questions(world, newcomers, ORDINARY[profile], EDITS[profile], seed)
    return {(it["fact"].entity, it["fact"].relation) for it in old_items + edit_items}


def recall_at_k(db, world, items, k: int) -> float:
    ids, _ = db.search([it["question"] for it in items], k)
    return sum(any(holds_fact(db.passage(i), world, it["fact"]) for i in row if i >= 0)
               for row, it in zip(ids, items)) / max(1, len(items))


def read_all(model, tokenizer, db, items, k: int, with_passages: bool, desc: str, free: bool = False) -> list[dict]:
    """Each item's reply and scores (passages retrieved from db when with_passages; the reply in the
    book's words unless free, book.answer)."""
    passages = [None] * len(items)
    if with_passages:
        ids, _ = db.search([it["question"] for it in items], k)
        passages = [[db.passage(i) for i in row if i >= 0] for row in ids]
    return [scored_reply(it, answer(model, tokenizer, it["question"], ps, max_new_tokens=budget(tokenizer, it),
                                    free=free), ps)
            for it, ps in zip(tqdm(items, desc=desc, leave=False), passages)]


def budget(tokenizer, item) -> int:
    """Tokens a reader may write for an item: its answer's and a few more."""
    return len(tokenizer.encode_ordinary(" " + item["answer"])) + EXTRA_TOKENS


def scored_reply(item, reply: str, passages) -> dict:
    """A reply to an item, scored: the short answer taken out of it, exact match and F1 against the value."""
    fact, predicted = item["fact"], answer_value(reply, item["fact"].relation)
    return {"question": item["question"], "expected": item["answer"], "reply": reply, "passages": passages,
            "value": fact.value, "predicted_value": predicted, "em": exact_match(predicted, fact.value),
            "f1": token_f1(predicted, fact.value), "sentence_em": exact_match(reply, item["answer"])}


def mean(rows, key) -> float:
    return sum(r[key] for r in rows) / max(1, len(rows))


def answer_prior(world, newcomers, items) -> float:
    """Exact match of a reader that always says its relation's most common value in the training world:
    the level a closed-book model reaches on database-only facts without knowing anything about them."""
    common = {}
    for f in world.facts:
        if f.entity not in newcomers:
            common.setdefault(f.relation, Counter())[f.value] += 1
    return sum(it["fact"].value == common[it["fact"].relation].most_common(1)[0][0] for it in items) / len(items)


def plot(metrics: dict, path) -> pathlib.Path:
    fig, ax = new_figure(width=8, height=4)
    groups = [("database-only", ""), ("ordinary", "_ordinary")]
    colors = {"closed_book": "#bbbbbb", "in_context": "#dd8452", "open_book_sft_free": "#a1c9f4",
              "open_book_sft": "#4c72b0", "retro_book": "#8172b3"}
    width = 0.16
    for g, (label, suffix) in enumerate(groups):
        for r, reader in enumerate(colors):  # part 1's readers, then the instruction-tuned Retro model
            value = metrics.get(f"qa_em_{reader}{suffix}")
            if value is not None:
                ax.bar(g + r * width, 100 * value, width, color=colors[reader], label=reader if g == 0 else None)
                ax.annotate(f"{100 * value:.0f}", (g + r * width, 100 * value), ha="center", va="bottom", fontsize=8)
    for r, (key, color) in enumerate((("edited_fact_success_free", "#a1c9f4"), ("edited_fact_success", "#55a868"))):
        if metrics.get(key) is not None:
            x = 2 + (r + 2) * width
            ax.bar(x, 100 * metrics[key], width, color=color,
                   label="edited facts (new value)" if key == "edited_fact_success" else None)
            ax.annotate(f"{100 * metrics[key]:.0f}", (x, 100 * metrics[key]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks([2 * width + g for g in range(3)], ["database-only facts", "ordinary facts", "after edit_db"])
    ax.set(ylabel="exact match (%)", ylim=(0, 110), title="Closed book vs open book")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=None, help="database folder (default out/step5/db)")
    parser.add_argument("--chat_model", default=None, help="step 4's chat model (default out/step4/sft_model.pt)")
    parser.add_argument("--open_book_model", default=None,
                        help="the open-book fine-tuned model (default out/step5/open_book_model.pt; skipped if absent)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default out/tokenizer.json)")
    parser.add_argument("--embedder_model", default=None,
                        help="checkpoint for the model embedder's recall (default out/step3/model.pt; "
                             "skipped if absent)")
    parser.add_argument("--k", type=int, default=None, help="passages per question (default 2, quick 1)")
    parser.add_argument("--out", default=None, help="folder for metrics, replies and the chart (default out/step5)")
    parser.add_argument("--recall_only", action="store_true",
                        help="measure retrieval recall for both embedders and stop (no model answers anything)")
    parser.add_argument("--retro_model", default=None,
                        help="Retro model for the perplexity rows (default out/step5/retro_from_scratch.pt)")
    parser.add_argument("--plain_model", default=None,
                        help="its plain twin (default out/step5/plain_from_scratch.pt)")
    parser.add_argument("--retro_sft_model", default=None,
                        help="instruction-tuned Retro model for the Retro QA rows (default out/step5/retro_sft.pt)")
    parser.add_argument("--retro_only", action="store_true",
                        help="measure only the Retro rows (no database, no chat model needed)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    args.k = args.k or READER_K["quick" if args.quick else "default"]
    started = time.time()
    profile = "quick" if args.quick else "default"
    out_dir = pathlib.Path(args.out or step_dir(5))
    tokenizer, fingerprint = load_tokenizer_with_fingerprint(args.tokenizer)
    device = pick_device(args.device)
    metrics, replies, book = {}, [], None
    if not args.retro_only:
        metrics, replies, book = open_book_rows(args, tokenizer, fingerprint, device, profile)
        if args.recall_only:
            return metrics
    retro_metrics, retro_replies = retro_rows(args, tokenizer, device, profile, book)
    metrics.update(retro_metrics)

    metrics["eval_seconds"] = round(time.time() - started, 1)
    written = []
    for rows, name in ((replies, "eval_replies.jsonl"), (retro_replies, "retro_eval_replies.jsonl")):
        if rows:
            write_jsonl(rows, out_dir / name)
            written.append(str(out_dir / name))
    write_metrics(5, metrics, folder=out_dir)
    if not args.retro_only:
        written.insert(0, str(plot(metrics, out_dir / "retrieval_qa.png")))
    print(f"wrote {', '.join(written) or 'no file'} in {metrics['eval_seconds']:.0f} s")
    return metrics


def open_book_rows(args, tokenizer, fingerprint, device, profile) -> tuple[dict, list[dict], tuple]:
    """Part 1's rows: recall, the three readers closed and open book, and the edited book.
    Also returns the book (database, its world, database-only items, ordinary items) for Retro to read."""
    db_dir = pathlib.Path(args.db or step_dir(5) / "db")
    db = load_database(db_dir, tokenizer)
    info = db.meta.get("world")
    if not info or info["overrides"]:
        raise UserError(f"{db_dir}: evaluation needs a database built from the world and not edited since; "
                        f"run {next_command('python step5_retro/build_db.py')}")
    world, newcomers = extended_world(quick=info["size"] == "quick", seed=info["seed"])
    new_items, old_items, edit_items = questions(world, newcomers, ORDINARY[profile], EDITS[profile], args.seed)
    all_items = new_items + old_items
    metrics = {"n_database_only": len(new_items), "n_ordinary": len(old_items), "n_edits": len(edit_items), "k": args.k,
               "answer_prior": answer_prior(world, newcomers, new_items)}

    recall = {db.meta["embedder"]: recall_at_k(db, world, all_items, args.k)}
    other = "model" if db.meta["embedder"] == "tfidf" else "tfidf"
    embedder_model = pathlib.Path(args.embedder_model or step_dir(3) / "model.pt")
    if other == "tfidf" or embedder_model.exists():
        twin = build_database(db.documents, tokenizer, None, chunk_size=db.chunk_size, embedder=other, k=db.k,
                              titles=db.titles, model_checkpoint=embedder_model)
        recall[other] = recall_at_k(twin, world, all_items, args.k)
    metrics["retrieval_recall"] = recall[db.meta["embedder"]]
    metrics["retrieval_recall_by_embedder"] = recall
    print("recall@%d: " % args.k + ", ".join(f"{name} {value:.3f}" for name, value in recall.items()))
    book = (db, world, new_items, old_items)
    if args.recall_only:
        return metrics, [], book

    chat_path = pathlib.Path(args.chat_model or step_dir(4) / "sft_model.pt")
    open_path = pathlib.Path(args.open_book_model or step_dir(5) / "open_book_model.pt")
    # (model, with passages, free): a reader with passages writes only the book's words (book.book_words);
    # the open-book model is also asked free, to show what the rule adds.
    readers = {"closed_book": (chat_path, False, False), "in_context": (chat_path, True, False)}
    if open_path.exists():
        readers["open_book_sft"] = (open_path, True, False)
        readers["open_book_sft_free"] = (open_path, True, True)
    else:
        make = next_command("python step5_retro/sft_open_book.py")
        print(f"{open_path} not found: no open-book SFT row (run {make})")
    models = {path: load_chat_model(path, device=device, tokenizer_fingerprint=fingerprint)
              for path, _, _ in readers.values()}
    replies = {}
    for reader, (path, with_passages, free) in readers.items():
        rows = read_all(models[path], tokenizer, db, all_items, args.k, with_passages, reader, free)
        replies[reader] = rows
        new_rows, old_rows = rows[:len(new_items)], rows[len(new_items):]
        metrics.update({f"qa_em_{reader}": mean(new_rows, "em"), f"qa_f1_{reader}": mean(new_rows, "f1"),
                        f"qa_sentence_em_{reader}": mean(new_rows, "sentence_em"),
                        f"qa_em_{reader}_ordinary": mean(old_rows, "em"),
                        f"qa_f1_{reader}_ordinary": mean(old_rows, "f1"),
                        f"qa_sentence_em_{reader}_ordinary": mean(old_rows, "sentence_em")})
        print(f"{reader:>14}: database-only EM {100 * metrics[f'qa_em_{reader}']:.1f} % "
              f"(F1 {100 * metrics[f'qa_f1_{reader}']:.1f}), "
              f"ordinary EM {100 * metrics[f'qa_em_{reader}_ordinary']:.1f} %")

    # The edit: a copy of the database in memory (out_dir None: nothing saved), the same readers' weights.
    edited = load_database(db_dir, tokenizer)
    edited.out_dir = None
    change = edit_book(edited, [{"entity": it["fact"].entity, "relation": it["fact"].relation,
                                 "value": it["fact"].value} for it in edit_items])
    editor = "open_book_sft" if "open_book_sft" in readers else "in_context"
    path = readers[editor][0]
    after_edit = read_all(models[path], tokenizer, edited, edit_items, args.k, True, "edited facts")
    after_rest = read_all(models[path], tokenizer, edited, all_items, args.k, True, "unrelated facts")
    after_edit_free = read_all(models[path], tokenizer, edited, edit_items, args.k, True, "edited facts, free", True)
    before = mean(replies[editor], "em")
    metrics.update({"edit_reader": editor, "edited_fact_success": mean(after_edit, "em"),
                    "edited_fact_success_free": mean(after_edit_free, "em"),
                    "edited_fact_recall": recall_at_k(edited, world_after(world, edit_items), edit_items, args.k),
                    "unrelated_fact_drop": round(100 * (before - mean(after_rest, "em")), 2),
                    "edit_documents_rewritten": len(change["documents_rewritten"]),
                    "edit_chunks_reembedded": change["added_chunks"]})
    print(f"after editing {len(edit_items)} facts ({change['added_chunks']} chunks re-embedded, no weight changed): "
          f"{100 * metrics['edited_fact_success']:.1f} % answered with the new value; unrelated facts moved by "
          f"{-metrics['unrelated_fact_drop']:+.1f} points ({editor}; "
          f"{100 * metrics['edited_fact_success_free']:.1f} % when it may write any word)")

    return metrics, ([{"reader": r, **row} for r, rows in replies.items() for row in rows]
                     + [{"reader": f"{editor}_after_edit", **row} for row in after_edit]
                     + [{"reader": f"{editor}_free_after_edit", **row} for row in after_edit_free]), book


# ----------------------------------------------------------------------------- the Retro rows

def retro_rows(args, tokenizer, device, profile, book=None) -> tuple[dict, list[dict]]:
    """Part 2's rows, on worlds no run trained on: perplexity of the Retro model (with its neighbours,
    retrieval off) and of its plain twin; the instruction-tuned Retro model's answers and edited facts;
    with part 1's book, its questions too. A missing checkpoint skips its rows with the command that makes it."""
    metrics, replies = {}, []
    retro_path = pathlib.Path(args.retro_model or step_dir(5) / "retro_from_scratch.pt")
    plain_path = pathlib.Path(args.plain_model or step_dir(5) / "plain_from_scratch.pt")
    sft_path = pathlib.Path(args.retro_sft_model or step_dir(5) / "retro_sft.pt")
    missing = [path for path in (retro_path, plain_path) if not path.exists()]
    if missing:
        print(f"{missing[0]} not found: no Retro perplexity rows (run {next_command(MAKE_RETRO)})")
    else:
        metrics.update(retro_perplexity(retro_path, plain_path, tokenizer, device, profile))
    if not sft_path.exists():
        print(f"{sft_path} not found: no Retro QA rows (run {next_command(MAKE_SFT_RETRO)})")
        return metrics, replies
    model, database = load_retro(sft_path, device)
    check_vocab(model.config, tokenizer)
    check_database(database, {"tokenizer_sha": tokenizer_sha(tokenizer)}, str(sft_path), fix=MAKE_SFT_RETRO)
    qa, replies = retro_answers(model, tokenizer, profile, args.seed)
    metrics.update(qa)
    if book is not None:
        on_book, book_replies = retro_reads_the_book(model, tokenizer, *book)
        metrics.update(on_book)
        replies += book_replies
    return metrics, replies


def retro_reads_the_book(model, tokenizer, db, world, new_items, old_items) -> tuple[dict, list[dict]]:
    """Part 1's questions (database-only and ordinary facts of step 3's world) answered by the instruction-
    tuned Retro model, the database cut into its chunk size: side by side with the open book's rows
    (qa_em_retro_book, qa_em_retro_book_ordinary)."""
    library = library_for(db, tokenizer, model.retro)
    items = new_items + old_items
    found, _ = question_neighbours(library, [it["question"] for it in items], model.retro.k)
    rows = [scored_reply(it, retro_answer(model, tokenizer, it["question"], passages(library, ids, tokenizer.eot_id),
                                          budget(tokenizer, it)), None)
            for it, ids in zip(tqdm(items, desc="retro on the book", leave=False), found)]
    new_rows, old_rows = rows[:len(new_items)], rows[len(new_items):]
    metrics = {"qa_em_retro_book": mean(new_rows, "em"), "qa_f1_retro_book": mean(new_rows, "f1"),
               "qa_em_retro_book_ordinary": mean(old_rows, "em"),
               "retro_book_recall": sum(any(holds_fact(library.passage(i), world, it["fact"]) for i in ids)
                                        for it, ids in zip(items, found)) / max(1, len(items))}
    print(f"{'retro_book':>24}: database-only EM {100 * metrics['qa_em_retro_book']:.1f} %, "
          f"ordinary EM {100 * metrics['qa_em_retro_book_ordinary']:.1f} % (step 3's world, the database cut into "
          f"chunks of {model.retro.chunk_size})")
    return metrics, [{"reader": "retro_book", **row} for row in rows]


def retro_perplexity(retro_path, plain_path, tokenizer, device, profile) -> dict:
    """train_retro.py's validation, measured again: its held-out worlds, read three ways, and the plain twin."""
    model, database = load_retro(retro_path, device)
    plain = load_plain(plain_path, device)
    check_vocab(model.config, tokenizer)
    val = retro_split(range(VAL_SEED0, VAL_SEED0 + RETRO_VAL_WORLDS[profile]), tokenizer, model.config.block_size,
                      model.retro.chunk_size, model.retro.k, progress=False)
    check_database(database, val.meta, str(retro_path))
    rows = RETRO_ROWS[profile]
    figures = {mode: measure(model, val, mode, rows) for mode in NEIGHBOUR_MODES}
    twin = measure(plain, val, "off", rows)
    print(f"Retro perplexity on {RETRO_VAL_WORLDS[profile]} held-out worlds: {figures['retrieved']['ppl']:.3f} with "
          f"its neighbours, {figures['off']['ppl']:.3f} retrieval off, {figures['random']['ppl']:.3f} random "
          f"neighbours; plain twin {twin['ppl']:.3f} (fact ppl {figures['retrieved']['fact_ppl']:.3f} vs "
          f"{twin['fact_ppl']:.3f})")
    return {"retro_val_ppl": figures["retrieved"]["ppl"], "retro_val_ppl_no_retrieval": figures["off"]["ppl"],
            "retro_val_ppl_random_neighbours": figures["random"]["ppl"], "gpt_val_ppl": twin["ppl"],
            "retro_val_fact_ppl": figures["retrieved"]["fact_ppl"], "gpt_val_fact_ppl": twin["fact_ppl"]}


def retro_answers(model, tokenizer, profile: str, seed: int) -> tuple[dict, list[dict]]:
    """Questions about held-out worlds, answered by the instruction-tuned Retro model with the question's
    neighbours, with retrieval off and with random chunks of another world's library; then facts edited
    in a world's library (its fact sheets rewritten, re-retrieved; no weight changes) and asked again."""
    m, k, pad = model.retro.chunk_size, model.retro.k, tokenizer.eot_id
    worlds = [build_world(s, "quick") for s in range(VAL_SEED0, VAL_SEED0 + RETRO_VAL_WORLDS[profile])]
    libraries = [world_library(w, tokenizer, m, k) for w in worlds]
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    items = [dict(it, library=i) for i, (w, lib) in enumerate(zip(worlds, libraries))
             for it in world_questions(w, lib, k, random.Random(w.seed))]
    items = rng.sample(items, min(RETRO_QUESTIONS[profile], len(items)))

    def random_chunks(it):  # k chunks drawn at random from the next world's library: no answer in them
        other = libraries[(it["library"] + 1) % len(libraries)]
        return passages(other, np_rng.integers(0, len(other.chunks), size=k), pad)
    readings = {"retro": lambda it: passages(libraries[it["library"]], it["chunks"], pad),
                "retro_no_retrieval": lambda it: None, "retro_random_neighbours": random_chunks}
    metrics, replies = {"n_retro_questions": len(items), "retro_qa_recall": mean(items, "holds")}, []
    for reading, neighbours in readings.items():
        rows = [scored_reply(it, retro_answer(model, tokenizer, it["question"], neighbours(it), budget(tokenizer, it)),
                             None) for it in tqdm(items, desc=reading, leave=False)]
        replies += [{"reader": reading, "neighbours_state_it": bool(it["holds"]), **row}
                    for it, row in zip(items, rows)]
        metrics.update({f"qa_em_{reading}": mean(rows, "em"), f"qa_f1_{reading}": mean(rows, "f1")})
        print(f"{reading:>24}: held-out worlds EM {100 * mean(rows, 'em'):.1f} % (F1 {100 * mean(rows, 'f1'):.1f})")
        if reading == "retro":  # the questions whose neighbours do state the answer
            metrics["qa_em_retro_answerable"] = mean([r for r, it in zip(rows, items) if it["holds"]], "em")

    edits = [edit_item(worlds[i], tokenizer, m, k, rng) for i in
             [rng.randrange(len(worlds)) for _ in range(RETRO_EDITS[profile])]]
    edits = [e for e in edits if e is not None]
    rows = [scored_reply(e, retro_answer(model, tokenizer, e["question"], e["neighbours"], budget(tokenizer, e)),
                         None) for e in tqdm(edits, desc="edited facts", leave=False)]
    replies += [{"reader": "retro_after_edit", "neighbours_state_it": bool(e["holds"]), "old": e["old"], **row}
                for e, row in zip(edits, rows)]
    metrics.update({"n_retro_edits": len(edits), "edited_fact_success_retro": mean(rows, "em"),
                    "edited_fact_old_value_retro": sum(exact_match(r["predicted_value"], e["old"])
                                                       for r, e in zip(rows, edits)) / max(1, len(edits)),
                    "edited_fact_recall_retro": mean(edits, "holds")})
    print(f"after editing {len(edits)} facts in held-out libraries (no weight changed): "
          f"{100 * metrics['edited_fact_success_retro']:.1f} % answered with the new value, "
          f"{100 * metrics['edited_fact_old_value_retro']:.1f} % with the old one "
          f"(recall of the new sentence {100 * metrics['edited_fact_recall_retro']:.1f} %)")
    return metrics, replies


def edit_item(world, tokenizer, chunk_size: int, k: int, rng: random.Random) -> dict | None:
    """One fact of `world` given a new value of the same kind, written into its library: every fact sheet
    that states it is rewritten and re-embedded (Database.edit_documents); the question about the new
    fact and its neighbours retrieved again. None if the world has no other value for the fact."""
    fact = rng.choice(world.facts)
    values = sorted({f.value for f in world.facts if f.relation == fact.relation} - {fact.value, fact.entity})
    if not values:
        return None
    new = type(fact)(fact.entity, fact.relation, rng.choice(values))
    edited = apply_overrides(world, {(fact.entity, fact.relation): new.value})
    library = world_library(world, tokenizer, chunk_size, k)
    sheets = [documents_about(edited, name)[0] for name in world.entities]
    library.edit_documents({i: sheet for i, sheet in enumerate(sheets) if sheet != library.documents[i]})
    question, answer = ask(new, rng)
    chunk_ids, _ = question_neighbours(library, [question], k)
    return {"fact": new, "question": question, "answer": answer, "old": fact.value,
            "neighbours": passages(library, chunk_ids[0], tokenizer.eot_id),
            "holds": any(holds_fact(library.passage(i), edited, new) for i in chunk_ids[0])}


def world_after(world, edit_items):
    return apply_overrides(world, {(it["fact"].entity, it["fact"].relation): it["fact"].value for it in edit_items})


if __name__ == "__main__":
    run_main(main)
