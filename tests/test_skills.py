"""Tests of the skill documents mixed into the pretraining corpus (common/world/skills.py)."""
import re

import pytest

from common.world.corpus import (QUIZ_SHARE, SKILL_SHARE, default_documents, generated_documents,
                                 split_heldout, world_training_documents)
from common.world.skills import MAX_NUMBER, WORDS, echo_documents, skill_documents
from common.world.world import CORPUS_BYTES, build_world, generate_documents, phrasings, quiz_documents


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0)


@pytest.fixture(scope="module")
def docs(world):
    return skill_documents(world, target_bytes=200_000, seed=0)


def test_same_seed_same_text_and_the_size_asked_for(world, docs):
    assert skill_documents(world, target_bytes=200_000, seed=0) == docs
    assert skill_documents(world, target_bytes=200_000, seed=1) != docs
    assert 200_000 <= sum(len(d) + 2 for d in docs) < 201_000
    assert all(d.isascii() and "\n\n" not in d and d == d.strip() for d in docs)


def test_every_sum_is_right_and_every_total_is_carried_on(docs):
    with_sums = [d for d in docs if " = " in d]
    stories, worksheets = [d for d in with_sums if " has " in d], [d for d in with_sums if "practised sums:" in d]
    assert len(stories) > 100 and len(worksheets) > 100 and len(stories) + len(worksheets) == len(with_sums)
    for doc in with_sums:
        steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", doc)
        for a, op, b, c in steps:
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)), doc
            assert 0 < int(c) <= 20 and 0 < int(b) <= 9
        for (_, _, _, c), (a, _, _, _) in zip(steps, steps[1:]):
            assert c == a, doc  # the next step starts from the last result
    for story in stories:
        steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", story)
        assert re.match(r"\w+ has " + steps[0][0] + " ", story), story  # the story starts from the first number
        assert story.endswith(f"has {steps[-1][3]} " + story.split()[-1])
    for sheet in worksheets:  # a header line, then nothing but sums, one per line
        assert all(re.fullmatch(r"\d+ [+-] \d = \d+", line) for line in sheet.splitlines()[1:]), sheet
        assert 8 <= len(sheet.splitlines()) - 1 <= 14


def test_what_is_said_earlier_is_what_comes_back(world, docs):
    """The skills are copying skills: the later text repeats exactly what the earlier text said."""
    names = [n.lower() for n in world.names()]
    for d in docs:
        if d.startswith("A traveler came to"):
            town, host = re.match(r"A traveler came to (\w+) and met (\w+)\.", d).groups()
            opening = re.search(r'"(?:Hello, my name is|I am|Call me) (\w+)," said the traveler\.', d)
            name, tail = opening.group(1), d[opening.end():]
            assert town == world.fact(host, "lives_in") and name != host, d  # true to the world
            assert name in world.names() or not any(name.lower() in n or n in name.lower() for n in names), d
            number = re.match(r' "My favorite number is (\d)\."', tail)
            if "What was your favorite number?" in tail:  # the number comes back, said by its owner
                assert number and tail.endswith(f'"My favorite number is {number.group(1)}," said {name}.'), d
            else:  # the name comes back in one of three set phrases
                assert tail.endswith((f'"Your name is {name}, I remember."', f'"Good morning, {name}!"',
                                      f'"My name is {name}," said the traveler.')), d
        elif "made a numbered list" in d:
            words = re.search(r"what to buy: ([a-z, ]+)\.", d).group(1).split(", ")
            assert d.split(":\n")[1].splitlines() == [f"{i}. {w}" for i, w in enumerate(words, 1)] + [
                f"There are {len(words)} items on the list."]
        elif "changed one word" in d:
            before, after = re.findall(r'"I like ([a-z, ]+)\."', d)
            old, new = re.search(r"changed one word, (\w+) for (\w+),", d).groups()
            assert re.search(rf"\b{old}\b", before) and not re.search(rf"\b{new}\b", before), d
            assert after == re.sub(rf"\b{old}\b", new, before) and old in WORDS and new in WORDS


def test_an_echo_game_says_back_exactly_the_row_it_said_and_is_not_in_the_default_corpus(world):
    games = echo_documents(world, 300, seed=0)
    assert games == echo_documents(world, 300, seed=0) and games != echo_documents(world, 300, seed=1)
    pool = set(WORDS) | set(world.names("person")) | {str(n) for n in range(1, MAX_NUMBER + 1)}
    words, made_up = 0, []
    for game in games:
        said = re.fullmatch(r"(\w+) played the echo game with the children\. \1 said: ([\w, ]+)\. "
                            r"The children said back: ([\w, ]+)\.", game)
        assert said and said.group(2) == said.group(3), game
        row = said.group(2).split(", ")
        assert 4 <= len(row) <= 10, game
        words += len(row)
        made_up += [w for w in row if w not in pool]
    assert 0.05 * words < len(made_up) < 0.15 * words  # about 1 word in 10
    assert all(w.isalpha() and w.istitle() and w not in world.names() for w in made_up)
    assert not any("echo game" in d for d in generated_documents(quick=True))


def test_skill_text_states_no_fact_of_the_world(world, docs):
    text = "\n".join(docs)
    assert [f for f in world.facts if any(p in text for p in phrasings(world, f))] == []


def test_the_default_corpus_is_world_text_quiz_pages_and_skill_text(world):
    docs = generated_documents()
    world_bytes = round(CORPUS_BYTES['default'] * (1 - SKILL_SHARE - QUIZ_SHARE))
    world_docs = generate_documents(world, target_bytes=world_bytes, seed=0)
    quiz = quiz_documents(world, target_bytes=round(CORPUS_BYTES['default'] * QUIZ_SHARE), seed=0)
    skill = [d for d in docs if d not in set(world_docs + quiz)]
    share = lambda part: sum(len(d) + 2 for d in part) / sum(len(d) + 2 for d in docs)  # noqa: E731
    assert abs(share(skill) - SKILL_SHARE) < 0.01 and abs(share(quiz) - QUIZ_SHARE) < 0.01
    assert len(docs) == len(world_docs) + len(quiz) + len(skill)


def test_held_out_documents_are_never_training_documents():
    docs = [f"doc {i}" for i in range(20)]
    docs[0] = docs[9] = "a short story the generator wrote twice"
    train, heldout = split_heldout(docs, fraction=0.1)  # every 10th document is held out: 9 and 19
    assert heldout == ["doc 19"]  # document 9 is also document 0, a training document
    assert train == [d for i, d in enumerate(docs) if i not in (9, 19)]


def test_replayed_text_is_the_world_part_of_the_training_split():
    """Step 4 replays these: every world document of the training split, in order, and no skill text."""
    train, heldout = default_documents(quick=True)
    skill = set(skill_documents(build_world(0, "quick"), target_bytes=round(CORPUS_BYTES['quick'] * SKILL_SHARE),
                                seed=0))
    replayed = world_training_documents(quick=True)
    assert replayed == [d for d in train if d not in skill]
    assert len(replayed) > 50 and not set(replayed) & skill and not set(replayed) & set(heldout)
