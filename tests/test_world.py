"""Tests of the fictional world and its corpus (common/world/world.py)."""
import random
import re
import time

import pytest

from common.cli import UserError
from common.world.world import (
    CORPUS_BYTES, EXAM_SHARE, KIND_RELATIONS, LINKS, QUESTIONS, STATEMENTS, Fact, apply_overrides, ask,
    build_world, documents_about, generate_documents, main, phrasings, quiz_documents, split_facts, visible_facts)


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0)


@pytest.fixture(scope="module")
def quick_world():
    return build_world(seed=0, size="quick")


def mentions(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


def stated(text: str, world, fact) -> bool:
    return any(p in text for p in phrasings(world, fact))


def test_same_seed_gives_the_same_world_and_text(world):
    again = build_world(seed=0)
    assert again.facts == world.facts and again.entities == world.entities
    assert world.fact("Wendel", "lives_in") == "Caldford"  # pinned: seed 0 is the tutorial's world
    text = generate_documents(world, target_bytes=100_000, seed=3)
    assert generate_documents(again, target_bytes=100_000, seed=3) == text
    assert generate_documents(world, target_bytes=100_000, seed=4) != text
    assert build_world(seed=1).facts != world.facts


def test_world_shape(world, quick_world):
    kinds = [world.entities[n] for n in world.entities]
    assert (kinds.count("person"), kinds.count("place"), kinds.count("creature")) == (40, 14, 20)
    assert len(world.facts) == 296
    assert len(quick_world.entities) == 20
    for w in (world, quick_world):
        names = list(w.entities)
        assert all(a.lower() not in b.lower() for a in names for b in names if a != b)  # no name inside another
        for name, kind in w.entities.items():
            relations = [f.relation for f in w.facts_about(name)]
            assert 3 <= len(relations) <= 5 and set(relations) <= set(KIND_RELATIONS[kind])
        for f in w.facts:
            if f.relation in LINKS:
                assert w.entities[f.value] == LINKS[f.relation], f
            if f.relation == "friend":
                assert w.fact(f.value, "friend") == f.entity  # best friends come in pairs
            if f.relation == "pet":
                assert w.fact(f.value, "lives_in") == w.fact(f.entity, "lives_in")  # a pet lives with its owner
        assert w.fact(names[0], "lives_in") == w.get(names[0], "lives_in")
        with pytest.raises(KeyError):
            w.fact(names[0], "species")


def test_documents_are_ascii_blocks_without_blank_lines(world):
    docs = generate_documents(world, target_bytes=300_000)
    assert 300_000 <= sum(len(d) + 2 for d in docs) < 300_000 + 2_000
    assert all(d.isascii() and "\n\n" not in d and d == d.strip() for d in docs)
    assert len(generate_documents(world, n_docs=17)) == 17


def test_names_never_collide_with_ordinary_words(world):
    """A held-out name must not turn up as a plain English word of some template."""
    text = "\n".join(generate_documents(world, target_bytes=300_000))
    other_words = {w.lower() for w in re.findall(r"[A-Za-z]+", text)} - {n.lower() for n in world.entities}
    for name in world.entities:
        assert name.lower() not in other_words, name


def test_every_fact_is_stated_in_the_quick_and_default_corpora(world, quick_world):
    quick_text = "\n".join(generate_documents(quick_world))
    assert [f for f in quick_world.facts if not stated(quick_text, quick_world, f)] == []
    start = time.perf_counter()
    docs = generate_documents(world, target_bytes=CORPUS_BYTES["default"], seed=0)
    seconds = time.perf_counter() - start
    n_bytes = sum(len(d) for d in docs)
    print(f"default corpus: {len(docs)} documents, {n_bytes:,} bytes in {seconds:.2f} s")  # measured, not asserted
    text = "\n".join(docs)
    assert abs(n_bytes + 2 * len(docs) - CORPUS_BYTES["default"]) < 2_000
    # every fact many times, in its plain phrasing and in others
    for fact in world.facts[::10]:  # (counting all of them takes seconds)
        assert sum(text.count(p) for p in phrasings(world, fact)) >= 30, fact
    assert all(phrasings(world, f)[0] in text for f in world.facts)


def test_held_out_entities_never_appear(world):
    friend_of = world.fact("Wendel", "friend")                           # Arira
    pet_owner = next(f.entity for f in world.facts if f.relation == "pet")
    pet = world.fact(pet_owner, "pet")
    town = world.fact("Selabert", "lives_in")
    hold_out = ["Wendel", pet, town]
    docs = generate_documents(world, target_bytes=400_000, hold_out=hold_out)
    text = "\n".join(docs)
    for name in hold_out:
        assert not mentions(text, name), name
    visible = visible_facts(world, hold_out=hold_out)
    hidden = [f for f in world.facts if f not in visible]
    assert Fact(friend_of, "friend", "Wendel") in hidden and Fact(pet_owner, "pet", pet) in hidden
    assert Fact("Selabert", "lives_in", town) in hidden
    assert all(f.entity in hold_out or f.value in hold_out for f in hidden)
    assert [f for f in visible if not stated(text, world, f)] == []
    assert mentions(text, friend_of) and mentions(text, pet_owner) and mentions(text, "Selabert")


@pytest.mark.parametrize("kind", ["person", "place", "creature"])
def test_a_whole_kind_can_be_held_out(quick_world, kind):
    names = quick_world.names(kind)
    text = "\n".join(generate_documents(quick_world, target_bytes=50_000, hold_out=names))
    assert not any(mentions(text, n) for n in names)
    others = [n for n in quick_world.entities if n not in names]
    assert all(mentions(text, n) for n in others)


def test_overrides_rewrite_a_fact_everywhere(world):
    old_home, new_home = world.fact("Wendel", "lives_in"), "Willey"
    old_color = world.fact("Selabert", "favorite_color")
    new_color = "green" if old_color != "green" else "red"
    overrides = {("Wendel", "lives_in"): new_home, ("Selabert", "favorite_color"): new_color}
    text = "\n".join(generate_documents(world, target_bytes=400_000, overrides=overrides))
    old_facts = [Fact("Wendel", "lives_in", old_home), Fact("Selabert", "favorite_color", old_color)]
    new_facts = [Fact("Wendel", "lives_in", new_home), Fact("Selabert", "favorite_color", new_color)]
    for old, new in zip(old_facts, new_facts):
        assert not any(p in text for p in phrasings(world, old)), old
        assert sum(text.count(p) for p in phrasings(world, new)) >= 3, new
    assert f"Wendel, a painter from {old_home}" not in text       # stories follow the new home too
    assert world.fact("Wendel", "lives_in") == old_home               # the world itself is unchanged
    assert set(new_facts) <= set(visible_facts(world, overrides=overrides))
    assert apply_overrides(world, overrides).fact("Wendel", "lives_in") == new_home
    assert "Wendel lives in Willey." in documents_about(world, "Wendel", overrides=overrides)[0]


def test_bad_hold_out_or_override_is_a_user_error(world):
    with pytest.raises(UserError, match="Nobody"):
        generate_documents(world, n_docs=1, hold_out=["Nobody"])
    with pytest.raises(UserError, match="no such fact"):
        generate_documents(world, n_docs=1, overrides={("Wendel", "species"): "fox"})
    with pytest.raises(UserError, match="not a place"):
        generate_documents(world, n_docs=1, overrides={("Wendel", "lives_in"): "Atlantis"})
    with pytest.raises(UserError, match="not both"):
        generate_documents(world, target_bytes=10, n_docs=1)
    with pytest.raises(UserError, match="size"):
        build_world(size="huge")


def test_ask_answers_state_the_fact(world):
    assert set(QUESTIONS) == set(STATEMENTS) == {r for rels in KIND_RELATIONS.values() for r in rels}
    assert ask(Fact("Wendel", "lives_in", "Caldford")) == ("Where does Wendel live?", "Wendel lives in Caldford.")
    assert ask(Fact("Wendel", "profession", "painter"))[1] == "Wendel is a painter."
    rng = random.Random(0)
    seen = set()
    for fact in world.facts:
        question, answer = ask(fact, rng)
        seen.add(question.replace(fact.entity, "{e}"))
        assert question.endswith("?") and fact.entity in question and fact.value not in question
        assert answer.endswith(".") and re.search(rf"\b{re.escape(fact.value)}\b", answer)
        assert fact.entity in answer and world.fact(fact.entity, fact.relation) == fact.value
    assert len(seen) > len(QUESTIONS)  # more than one phrasing per relation gets used


def test_facts_split_into_quiz_and_exam_with_friend_pairs_together(world):
    quiz, exam = split_facts(world)
    assert split_facts(build_world(seed=0)) == (quiz, exam)  # fixed: steps 1 and 4 draw the same split
    assert sorted(quiz + exam, key=repr) == sorted(world.facts, key=repr) and not set(quiz) & set(exam)
    pairs = len([f for f in world.facts if f.relation == "friend"]) // 2
    groups = len(world.facts) - pairs  # a best-friend pair is one group of two facts
    exam_friends = [f for f in exam if f.relation == "friend"]
    assert len(exam) - len(exam_friends) // 2 == round(groups * EXAM_SHARE)
    for f in exam:
        if f.relation == "friend":  # the other half of the pair is on the same side
            assert Fact(f.value, "friend", f.entity) in exam


def test_quiz_pages_ask_only_quiz_facts_and_answer_them_rightly(world):
    quiz, exam = split_facts(world)
    docs = quiz_documents(world, target_bytes=100_000, seed=0)
    assert 100_000 <= sum(len(d) + 2 for d in docs) < 100_500 and docs == quiz_documents(world, 100_000, seed=0)
    answers = {ask(f)[1]: f for f in world.facts}  # every phrasing of a question has this one answer
    asked = set()
    for doc in docs:
        title, *lines = doc.split("\n")
        assert title == "Questions and answers" and 6 <= len(lines) <= 12 and len(lines) % 2 == 0
        for q, a in zip(lines[::2], lines[1::2]):
            assert q.startswith("Q: ") and q.endswith("?") and a.startswith("A: ")
            fact = answers[a[3:]]
            assert fact.entity in q and q[3:] in [t.format(e=fact.entity) for t in QUESTIONS[fact.relation][0]]
            asked.add(fact)
    assert asked <= set(quiz) and len(asked) > 0.9 * len(quiz)  # nearly every quiz fact, no exam fact
    text = "\n".join(docs)
    assert not [f for f in exam if ask(f)[1] in text]


def test_documents_about_states_facts_plainly(world):
    sheet, *more = documents_about(world, "Wendel", n_docs=3)
    assert sheet.startswith("Wendel\n") and len(more) == 2
    for fact in world.facts_about("Wendel"):
        assert phrasings(world, fact)[0] + "." in sheet
    place_sheet = documents_about(world, "Caldford")[0]
    assert "Wendel lives in Caldford." in place_sheet           # facts that point at the entity too
    assert all(mentions(doc, f.value) for doc in more for f in world.facts_about("Wendel"))  # varied entries


def test_script_prints_a_sample(capsys):
    result = main(["--quick", "--time"])
    out = capsys.readouterr().out
    assert result["entities"] == 20 and result["bytes"] > 190_000
    assert "Q: " in out and "A: " in out and "retrieval sheet" in out
