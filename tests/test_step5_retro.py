"""Step 5, part 1: the retrieval database, the book it holds, editing it, and the open book.

Unit tests use a small BPE tokenizer trained here and the quick world's fact sheets; the
script tests run the quick pipeline (build_db, sft_open_book, ask, eval_retrieval) on the
session's quick tokenizer and model (tests/conftest.py, quick_run).
"""
import json
import random
import re

import numpy as np
import pytest
import torch

from common.cli import UserError
from common.model import ModelConfig, Transformer
from common.world.corpus import generated_documents
from common.world.world import Fact, add_newcomers, apply_overrides, build_world, generate_documents
from step1_tokenizer.bpe import Tokenizer, train_bpe
from step4_sft.blend import blend, parse_blend
from step4_sft.tasks import make_datasets
from step5_retro import ask, build_db, edit_db, eval_retrieval, sft_open_book
from step5_retro.book import (book_documents, edit_book, edited_world, extended_world, holds_fact,
                              open_book_messages, open_book_records)
from step5_retro.database import build_database, load_database, tokenizer_sha
from step5_retro.scoring import exact_match, normalize, token_f1


@pytest.fixture(scope="module")
def tok():
    return train_bpe(generate_documents(build_world(0, "quick"), n_docs=80), vocab_size=256 + 4 + 500)


@pytest.fixture(scope="module")
def book():
    world, newcomers = extended_world(quick=True)
    titles, documents = book_documents(world)
    return world, newcomers, titles, documents


@pytest.fixture(scope="module")
def db_dir(tok, book, tmp_path_factory):
    out = tmp_path_factory.mktemp("db")
    _, _, titles, documents = book
    build_database(documents, tok, out, chunk_size=16, k=2, titles=titles)
    return out


# ----------------------------------------------------------------------------- the database

@pytest.mark.verifies(5, "Chunks never cross document boundaries")
def test_chunks_never_cross_documents(tok, book, db_dir):
    db = load_database(db_dir, tok)
    documents = book[3]
    for doc, text in enumerate(documents):
        rows = np.flatnonzero(db.chunk_doc == doc)
        assert db.chunk_pos[rows].tolist() == list(range(len(rows)))  # in order, none missing
        ids = tok.encode(text)
        assert len(rows) == -(-len(ids) // 16)
        for row in rows:  # each chunk is exactly its slice of its own document, padded at the end only
            piece = ids[db.chunk_pos[row] * 16:(db.chunk_pos[row] + 1) * 16]
            assert db.chunks[row].tolist() == piece + [tok.eot_id] * (16 - len(piece))
        assert db.continuation[rows].tolist() == rows[1:].tolist() + [-1]  # the next chunk of the same document


@pytest.mark.verifies(5, "No training chunk has a neighbour from its own document")
def test_no_chunk_has_a_neighbour_from_its_own_document(tok, db_dir):
    db = load_database(db_dir, tok)
    assert db.neighbours.shape == (len(db), 2) and (db.neighbours >= 0).all()
    assert (db.chunk_doc[db.neighbours] != db.chunk_doc[:, None]).all()
    # and they are the nearest such chunks: the same as a search that leaves the own document out
    ids, _ = db.search([c.tolist() for c in db.chunks[:10]], 2, exclude_docs=db.chunk_doc[:10])
    assert (ids == db.neighbours[:10]).all()


@pytest.mark.verifies(5, "The exact index returns each chunk as its own nearest neighbour")
@pytest.mark.parametrize("embedder", ["tfidf", "model"])
def test_exact_index_finds_each_chunk_itself(embedder, quick_run, book):
    from step1_tokenizer.bpe import load_tokenizer

    tokenizer = load_tokenizer(quick_run.tokenizer)
    _, _, titles, documents = book
    db = build_database(documents, tokenizer, None, chunk_size=32, embedder=embedder, titles=titles,
                        model_checkpoint=quick_run.model)
    ids, scores = db.search([c.tolist() for c in db.chunks], 1)
    seen = [tuple(c) for c in db.chunks.tolist()]
    unique = [i for i, c in enumerate(seen) if seen.count(c) == 1]
    assert len(unique) > len(db) // 2  # (two sheets can end alike: ". Quinilia has a pet dragon named Bixwick.")
    assert ids[unique, 0].tolist() == unique
    assert (db.chunks[ids[:, 0]] == db.chunks).all()  # a repeated chunk finds one of its copies
    assert np.allclose(scores[:, 0], 1.0, atol=1e-4)  # cosine of a unit vector with itself


@pytest.mark.verifies(5, "A database built with another tokenizer or chunk size is refused")
def test_other_tokenizer_or_chunk_size_is_refused(tok, db_dir):
    with pytest.raises(UserError, match="built with another tokenizer.*build_db.py"):
        load_database(db_dir, Tokenizer([]))
    with pytest.raises(UserError, match="built with chunk size 16, not 32.*--chunk_size 32"):
        load_database(db_dir, tok, chunk_size=32)
    with pytest.raises(UserError, match="built with the tfidf embedder, not model"):
        load_database(db_dir, tok, embedder="model")
    assert load_database(db_dir, tok, chunk_size=16, embedder="tfidf").meta["tokenizer_sha"] == tokenizer_sha(tok)


def test_tokenizer_fingerprint_matches_the_file_s(tok, tmp_path):
    from step1_tokenizer.bpe import tokenizer_fingerprint

    tok.save(tmp_path / "tokenizer.json")
    assert tokenizer_sha(tok) == tokenizer_fingerprint(tmp_path / "tokenizer.json")


def test_bad_database_requests_are_clear_errors(tok, book, tmp_path):
    _, _, titles, documents = book
    with pytest.raises(UserError, match="no retrieval database here; run python step5_retro/build_db.py"):
        load_database(tmp_path / "nowhere", tok)
    too_few = r"IVF256,Flat: \d+ training vectors for 256 IVF lists.*39 times.*--index IVF\d"
    with pytest.raises(UserError, match=too_few):
        build_database(documents, tok, None, chunk_size=16, index="IVF256,Flat")
    with pytest.raises(UserError, match=r"IVF4,PQ8: \d+ training vectors, but a product quantiser learns 256 codes"):
        build_database(documents, tok, None, chunk_size=16, index="IVF4,PQ8")
    with pytest.raises(UserError, match="k=500 neighbours from other documents.*pass a k of at most"):
        build_database(documents, tok, None, chunk_size=16, k=500)
    db = build_database(documents, tok, None, chunk_size=16)
    with pytest.raises(UserError, match=f"k={len(db) + 1} neighbours asked, but the database holds {len(db)}"):
        db.search(["Where?"], len(db) + 1)


def test_an_ivf_index_is_trained_then_filled_and_saved(tok, book, tmp_path):
    _, _, titles, documents = book
    db = build_database(documents, tok, tmp_path, chunk_size=16, index="IVF4,Flat", nprobe=4)
    again = load_database(tmp_path, tok)
    assert again.index.ntotal == len(db) and again.meta["index"] == "IVF4,Flat"
    query = [c.tolist() for c in db.chunks[:5]]
    assert (again.search(query, 2)[0] == db.search(query, 2)[0]).all()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


# ----------------------------------------------------------------------------- the book

@pytest.mark.verifies(5, "Held-out entities appear in the database and in no training text")
def test_newcomers_are_only_in_the_database():
    for quick in (False, True):  # each profile's newcomers, against the text that profile trains on
        training_text = generated_documents(quick) + [json.dumps(make_datasets(quick=quick))]
        world, newcomers = extended_world(quick)
        assert len(newcomers) == (6 if quick else 20)
        titles, documents = book_documents(world)
        for name in newcomers:
            assert name in titles and any(name in d for d in documents)
        pattern = re.compile("|".join(newcomers), re.IGNORECASE)  # not even inside another word
        assert not any(pattern.search(text) for text in training_text)


def test_newcomers_keep_every_existing_fact():
    base = build_world(0)
    world = add_newcomers(base, 12, 8)
    assert world.facts[:len(base.facts)] == base.facts
    new = [f for f in world.facts[len(base.facts):]]
    names = set(world.entities) - set(base.entities)
    assert {f.entity for f in new} == names
    links = {f.value for f in new if f.relation in ("lives_in", "friend", "pet")}
    assert links <= set(base.names("place")) | names  # existing towns, or other newcomers


@pytest.mark.verifies(5, "Editing the database changes the retrieved passage and the reader's answer "
                            "logits without changing any weight")
def test_edit_changes_passage_and_answer_not_weights(quick_run, tmp_path):
    from step1_tokenizer.bpe import load_tokenizer
    from step4_sft.chat_template import encode_prompt

    tokenizer = load_tokenizer(quick_run.tokenizer)
    build_db.main(["--quick", "--tokenizer", str(quick_run.tokenizer), "--out", str(tmp_path), "--chunk_size", "32"])
    db = load_database(tmp_path, tokenizer)
    world, newcomers = extended_world(quick=True)
    person = newcomers[0]
    old = world.fact(person, "lives_in")
    new = next(p for p in world.names("place") if p != old)
    question = f"Where does {person} live?"
    passage_before = db.passage(db.search([question], 1)[0][0, 0])
    torch.manual_seed(0)  # a reader whose context holds the whole prompt (the quick model reads only 64 tokens)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=256, n_layer=2, n_head=4,
                                    n_kv_head=2, n_embd=32)).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    def first_answer_logits(passage):
        prompt = encode_prompt(tokenizer, open_book_messages(question, [passage]))
        assert len(prompt) <= model.config.block_size
        return model(torch.tensor([prompt]))[0][0, -1]

    logits_before = first_answer_logits(passage_before)
    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps([{"entity": person, "relation": "lives_in", "value": new}]))
    result = edit_db.main(["--quick", "--edits", str(edits), "--db", str(tmp_path),
                           "--tokenizer", str(quick_run.tokenizer)])
    assert set(result["documents_rewritten"]) == {person, old, new}  # its sheet, the old town's, the new town's
    edited = load_database(tmp_path, tokenizer)
    passage_after = edited.passage(edited.search([question], 1)[0][0, 0])
    assert f"{person} lives in {old}" in passage_before and f"{person} lives in {new}" in passage_after
    assert not torch.equal(first_answer_logits(passage_after), logits_before)  # the reader's answer moves...
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # ...its weights do not
    # only the rewritten documents' chunks left the index and came back; the rest are untouched
    touched = np.isin(db.chunk_doc, [db.titles.index(n) for n in result["documents_rewritten"]])
    assert result["removed_chunks"] == touched.sum() and (edited.alive[:len(db)] == ~touched).all()
    assert (edited.chunks[:len(db)] == db.chunks).all() and edited.index.ntotal == int(edited.alive.sum())
    alive = edited.alive
    assert (edited.chunk_doc[edited.neighbours[alive]] != edited.chunk_doc[alive][:, None]).all()
    assert alive[edited.neighbours[alive]].all()  # no neighbour points at a removed chunk


@pytest.mark.verifies(5, "An open-book reader writes only tokens of its passages, its question and the "
                            "answers' template, unless it is let free")
def test_reader_writes_only_the_book_s_words(tok):
    from step4_sft.chat_template import CONTENT_PREFIX, decode_reply, encode_prompt
    from step5_retro.book import answer, answer_template_ids, book_words

    question, passages = "Where does Halra live?", ["Halra\nHalra lives in Willey. Halra is a cook."]
    allowed = book_words(tok, question, passages, tok.vocab_size)
    template = answer_template_ids(tok)
    assert {*tok.encode_ordinary(" lives"), *tok.encode_ordinary(" in"), *tok.encode_ordinary("'s")} <= template
    expected = set(template) | set(tok.encode_ordinary(question)) | set(tok.encode_ordinary(passages[0]))
    assert set(allowed.nonzero().flatten().tolist()) == expected | {tok.im_end_id}
    assert allowed[tok.encode_ordinary(CONTENT_PREFIX + "Halra lives in Willey.")].all()  # the answer, as replies start
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_kv_head=1,
                                    n_embd=16)).eval()
    prompt = torch.tensor([encode_prompt(tok, open_book_messages(question, passages))])
    favourite, outside = int(model(prompt)[0][0, -1].argmax()), tok.encode_ordinary(" Evergate")[0]
    assert not allowed[outside]  # a value the book lacks
    with torch.no_grad():  # make a token the book lacks the model's sure choice: free, it writes it; bound, never
        model.lm_head.weight[outside] = 100 * model.lm_head.weight[favourite]
    free = model.generate(prompt, 12, temperature=0.0)[0, prompt.size(1):].tolist()
    bound = model.generate(prompt, 12, temperature=0.0, allowed=allowed)[0, prompt.size(1):].tolist()
    assert free[0] == outside and allowed[bound].all()
    bound = bound[:bound.index(tok.im_end_id)] if tok.im_end_id in bound else bound
    assert answer(model, tok, question, passages, max_new_tokens=12) == decode_reply(tok, bound)


def test_bad_edits_are_clear_errors(tok, book, tmp_path):
    world, newcomers, titles, documents = book
    db = build_database(documents, tok, None, chunk_size=16, titles=titles)
    with pytest.raises(UserError, match="was not built from the world by build_db.py"):
        edit_book(db, [{"entity": newcomers[0], "relation": "lives_in", "value": world.names("place")[0]}])
    db.meta["world"] = {"seed": 0, "size": "quick", "newcomers": newcomers, "overrides": []}
    with pytest.raises(UserError, match="edit 1: unknown entity 'Nobody'"):
        edit_book(db, [{"entity": "Nobody", "relation": "lives_in", "value": "x"}])
    with pytest.raises(UserError, match=f"override \\({newcomers[0]}, height\\): no such fact"):
        edit_book(db, [{"entity": newcomers[0], "relation": "height", "value": "tall"}])
    with pytest.raises(UserError, match="edit 1: expected an object with exactly the keys entity, relation, value"):
        edit_book(db, [{"entity": newcomers[0]}])
    bad = tmp_path / "bad.json"
    bad.write_text('[{"entity": "x",\n "relation": }]')
    with pytest.raises(UserError, match="bad.json, line 2: not valid JSON"):
        edit_db.read_edits(bad)
    assert db.documents == documents  # nothing was changed by a refused edit


# ----------------------------------------------------------------------------- the open book

def test_open_book_examples_hold_their_answer_only_in_their_passages(tok, book):
    newcomers = book[1]
    records = open_book_records(tok, 150, seed=0, chunk_size=32, k=2, avoid=newcomers)
    real = build_world(0, "quick")
    counterfactual = 0
    for r in records:
        world = build_world(r["world_seed"], "quick")
        fact = Fact(*r["fact"])
        user, assistant = r["conversations"][0]["content"], r["conversations"][1]["content"]
        passages, question = user.rsplit("\nQuestion: ", 1)
        assert holds_fact(passages, world, fact) and fact.value in assistant and fact.entity in question
        assert not any(name in user for name in newcomers)
        counterfactual += real.get(fact.entity, fact.relation, fact.value) != fact.value
    assert len(records) == 150 and len({r["world_seed"] for r in records}) > 1
    assert counterfactual > 0  # known names with facts other than the training world's: read, do not recall


def test_renamed_worlds_tell_made_up_facts_about_known_names(tok):
    real = build_world(0, "quick")
    records = open_book_records(tok, 40, seed=0, chunk_size=32, k=2, known=real, known_share=1.0)
    assert all(r["renamed"] for r in records)
    facts = [Fact(*r["fact"]) for r in records]
    assert all(f.entity in real.entities for f in facts)  # every name is one step 3 read about
    for r, f in zip(records, facts):
        assert f.value in r["conversations"][0]["content"] and f.value in r["conversations"][1]["content"]
    differ = sum(real.get(f.entity, f.relation) != f.value for f in facts)
    assert differ > len(facts) // 2  # mostly not what the pretrained model remembers


def test_edited_worlds_contradict_memory_but_never_on_the_evaluated_facts(tok):
    real = build_world(0, "quick")
    held_out = {(f.entity, f.relation) for f in real.facts[::3]}
    world, edited = edited_world(real, random.Random(0), held_out)
    assert edited and all((f.entity, f.relation) not in held_out and real.get(f.entity, f.relation) != f.value
                          for f in edited)
    assert all(world.get(e, r) == real.get(e, r) for e, r in held_out)  # held-out facts keep their values
    assert sum(world.get(f.entity, f.relation) != f.value for f in real.facts) == len(edited)
    records = open_book_records(tok, 60, seed=0, chunk_size=32, k=2, known=real, edited_share=0.5,
                                held_out=held_out)
    edited = [r for r in records if r.get("edited") is not None]
    assert len(records) == 60 and len(edited) == 30
    for r in edited:
        fact = Fact(*r["fact"])
        user, assistant = r["conversations"][0]["content"], r["conversations"][1]["content"]
        assert (fact.entity, fact.relation) not in held_out
        world = apply_overrides(real, {(fact.entity, fact.relation): fact.value})
        assert holds_fact(user.rsplit("\nQuestion: ", 1)[0], world, fact) and fact.value in assistant
        assert (real.get(fact.entity, fact.relation) != fact.value) == r["edited"]  # edited: not what was read
    assert 10 <= sum(r["edited"] for r in edited) < 30  # mostly edited facts, some left as they were


def test_blend_draws_each_source_by_its_weight():
    a, b = [{"id": f"a{i}"} for i in range(10)], [{"id": f"b{i}"} for i in range(100)]
    mixed = blend([(a, 0.75), (b, 0.25)], n=40, seed=0)
    ids = [r["id"] for r in mixed]
    assert sum(i.startswith("a") for i in ids) == 30 and sum(i.startswith("b") for i in ids) == 10
    assert set(i for i in ids if i.startswith("a")) == {r["id"] for r in a}  # 3 whole passes over a
    assert parse_blend("x.jsonl:0.7,y.jsonl") == [("x.jsonl", 0.7), ("y.jsonl", 1.0)]
    with pytest.raises(UserError, match="weight 'lots' of x.jsonl is not a number"):
        parse_blend("x.jsonl:lots")


def test_squad_normalisation_exact_match_and_f1():
    assert normalize("The weather in Ashford is usually Rainy.") == "weather in ashford is usually rainy"
    assert exact_match("Halra is a fisher.", "halra is  fisher") == 1.0
    assert token_f1("Halra lives in Caldford.", "Halra lives in Evergate.") == 0.75
    assert token_f1("", "Halra") == 0.0 and exact_match("Halra", "Halra lives") == 0.0


def test_holds_fact_is_the_plain_sentence(book):
    world, newcomers, titles, documents = book
    fact = world.facts_about(newcomers[0])[0]
    assert holds_fact(documents[titles.index(newcomers[0])], world, fact)
    assert not holds_fact(documents[titles.index(newcomers[1])], world, fact)


# ----------------------------------------------------------------------------- the scripts

@pytest.fixture(scope="module")
def pipeline(quick_run, tmp_path_factory):
    """Step 4 at --quick size on the session's quick model, then every step 5 script."""
    from step4_sft import data as sft_data
    from step4_sft import train_sft

    root = tmp_path_factory.mktemp("step5")
    tok_args = ["--tokenizer", str(quick_run.tokenizer)]
    sft_data.main(["--create_sample", "--quick", "--out", str(root)])
    train_sft.main(["--quick", *tok_args, "--checkpoint", str(quick_run.model), "--data", str(root / "sft_train.jsonl"),
                    "--eval_data", str(root / "sft_eval.jsonl"), "--out", str(root), "--replay_data",
                    str(quick_run.data)])
    build_db.main(["--quick", *tok_args, "--out", str(root / "db")])
    trained = sft_open_book.main(["--quick", *tok_args, "--checkpoint", str(root / "sft_model.pt"), "--out", str(root),
                                  "--blend", f"open_book:0.5,{root / 'sft_train.jsonl'}:0.5",
                                  "--replay_data", str(quick_run.data)])
    metrics = eval_retrieval.main(["--quick", *tok_args, "--db", str(root / "db"), "--chat_model",
                                   str(root / "sft_model.pt"), "--open_book_model", str(root / "open_book_model.pt"),
                                   "--embedder_model", str(quick_run.model), "--out", str(root)])
    return root, trained, metrics


def test_quick_pipeline_writes_every_metric_and_the_chart(pipeline):
    root, trained, metrics = pipeline
    keys = {"retrieval_recall", "qa_em_closed_book", "qa_em_in_context", "qa_em_open_book_sft", "qa_f1_closed_book",
            "qa_f1_in_context", "qa_f1_open_book_sft", "edited_fact_success", "unrelated_fact_drop",
            "qa_em_open_book_sft_free", "edited_fact_success_free"}
    assert keys <= set(metrics)
    assert set(metrics["retrieval_recall_by_embedder"]) == {"tfidf", "model"}
    assert all(0 <= metrics[k] <= 1 for k in keys - {"unrelated_fact_drop"})
    assert (root / "retrieval_qa.png").stat().st_size > 0 and trained["steps"] == 30
    replies = [json.loads(line) for line in (root / "eval_replies.jsonl").open()]
    closed = [r for r in replies if r["reader"] == "closed_book"]
    assert len(closed) == metrics["n_database_only"] + metrics["n_ordinary"]
    assert all(r["passages"] is None for r in closed)
    free = [r for r in replies if r["reader"] == "open_book_sft_free"]
    assert [r["question"] for r in free] == [r["question"] for r in closed] and all(r["passages"] for r in free)
    assert metrics["qa_em_closed_book"] == sum(r["em"] for r in closed[:metrics["n_database_only"]]) / \
        metrics["n_database_only"]
    blended = [json.loads(line) for line in (root / "open_book_blend.jsonl").open()]
    assert len(blended) == 200 and sum(r.get("task") == "open_book" for r in blended) == 100  # the blend asked


def test_ask_shows_the_neighbours(pipeline, quick_run, capsys):
    root = pipeline[0]
    result = ask.main(["--quick", "Where does Halra live?", "--show_neighbours", "--db", str(root / "db"),
                       "--checkpoint", str(root / "open_book_model.pt"), "--tokenizer", str(quick_run.tokenizer)])
    shown = capsys.readouterr().out
    assert re.search(r"\[1\] chunk \d+ of document \d+ \(\w+\), score \d\.\d{3}:", shown)
    assert result["passages"] and f"A: {result['answer']}" in shown


def test_a_missing_chat_model_says_what_to_run(quick_run, tmp_path):
    with pytest.raises(UserError, match="no chat model to start from; run python step4_sft/train_sft.py --quick"):
        sft_open_book.main(["--quick", "--tokenizer", str(quick_run.tokenizer), "--checkpoint", str(tmp_path / "x.pt"),
                            "--out", str(tmp_path)])


@pytest.mark.verifies(5, "The step 5 notebook runs top to bottom")
def test_notebook_runs():
    from tests.notebooks import outputs_text, run_notebook

    text = outputs_text(run_notebook("step5_retro/step5_retro.ipynb"))
    for check in ("the same as database.py: True", "same vectors as database.py: True",
                  "each chunk's nearest vector is a chunk with the same tokens: True",
                  "same table as database.py: True",
                  "a neighbour from the chunk's own document: False", "moved from Caldford to Willey: True"):
        assert check in text
