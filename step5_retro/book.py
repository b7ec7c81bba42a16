"""The open book: what step 5's database holds, and how a reader is shown what it retrieved.

    world, newcomers = extended_world(quick=False)   # step 3's world plus people/creatures no text names
    titles, documents = book_documents(world)        # one fact sheet per entity (world.documents_about)
    ids, scores = db.search([question], k=2)
    messages = open_book_messages(question, [db.passage(i) for i in ids[0]])   # step 4's chat format

The newcomers (world.add_newcomers) were never in step 3's corpus nor in step 4's conversations:
a right answer about them can only come from the database.

    records = open_book_records(tokenizer, 3000, seed=0, avoid=newcomers)   # sft_open_book.py's examples

Open-book training examples come from RE-DRAWN worlds (build_world with other seeds): the same
kinds of names and values, shuffled into new facts, each world in a small database of its own. The
same name has other facts in every world, so no answer can be memorised: the only way to answer is
to read the passages.
"""
import random
import re

from common.cli import UserError
from common.world.world import (NEWCOMERS, QUESTIONS, add_newcomers, apply_overrides, ask, build_world,
                                documents_about, phrasings)

# Chunk size and passages per question, by profile: a --quick run must take seconds, so its
# passages are short and single.
CHUNK_SIZE = {"default": 32, "quick": 6}
READER_K = {"default": 2, "quick": 1}
ANSWER_TOKENS = 32  # the longest reply a reader writes (an answer sentence is about a dozen tokens)



def extended_world(quick: bool = False, seed: int = 0):
    """(world with newcomers, the newcomers' names). seed: the world's seed (step 3's corpus uses 0)."""
    size = "quick" if quick else "default"
    base = build_world(seed, size)
    # Step 4's conversations name the default world's entities in every profile: never a newcomer's name.
    avoid = build_world(seed, "default").entities if quick else ()
    world = add_newcomers(base, NEWCOMERS[size]["person"], NEWCOMERS[size]["creature"], avoid=avoid)
    return world, [name for name in world.entities if name not in base.entities]


def book_documents(world, overrides=None) -> tuple[list[str], list[str]]:
    """(titles, documents): every entity's fact sheet, in the world's entity order."""
    titles = list(world.entities)
    return titles, [documents_about(world, name, overrides)[0] for name in titles]


def holds_fact(text: str, world, fact) -> bool:
    """Does `text` state `fact` as a fact sheet states it (the plain phrasing)?"""
    return phrasings(world, fact)[0] in text


def open_book_messages(question: str, passages: list[str]) -> list[dict]:
    """The user turn of an open-book question: the passages first, then the question (InstructRetro's
    layout for a decoder that reads its neighbours in the prompt)."""
    lines = [f"[{i}] {p.strip()}" for i, p in enumerate(passages, 1)]
    return [{"role": "user", "content": "\n".join(lines + ["Question: " + question])}]


def retrieve_passages(db, question: str, k: int) -> tuple[list[int], list[float], list[str]]:
    """(chunk ids, scores, passages) of the question's k nearest chunks."""
    ids, scores = db.search([question], k)
    kept = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
    return [i for i, _ in kept], [s for _, s in kept], [db.passage(i) for i, _ in kept]


def renamed_world(world, names_from, rng):
    """`world` with its entities renamed to entities of `names_from` of the same kind (drawn at random):
    the same made-up facts, told about names a model has met with other facts."""
    from common.world.world import Fact, World

    mapping = {}
    for kind in ("place", "person", "creature"):
        mine = world.names(kind)
        mapping.update(zip(mine, rng.sample(names_from.names(kind), len(mine))))
    facts = [Fact(mapping[f.entity], f.relation, mapping.get(f.value, f.value)) for f in world.facts]
    return World(world.seed, world.size, {mapping[n]: k for n, k in world.entities.items()}, facts,
                 {mapping[n]: p for n, p in world.pronouns.items()})


def edited_world(world, rng, held_out=(), share: float = 0.2):
    """(`world` with a random `share` of its facts given another value of the same relation, as
    edit_db.py rewrites a fact; the edited facts). Facts in `held_out` ((entity, relation) pairs) keep
    their values."""
    values = {}
    for f in world.facts:
        values.setdefault(f.relation, set()).add(f.value)
    held_out = set(held_out)
    free = [f for f in world.facts if (f.entity, f.relation) not in held_out]
    if not free:
        raise UserError("edited_world: every fact of the world is held out; there is nothing to edit")
    overrides = {}
    for f in rng.sample(free, max(1, round(share * len(free)))):
        choices = sorted(values[f.relation] - {f.value, f.entity})
        if choices:
            overrides[f.entity, f.relation] = rng.choice(choices)
    edited = apply_overrides(world, overrides)
    return edited, [f for f in edited.facts if (f.entity, f.relation) in overrides]


def answerable_questions(world, facts, tokenizer, chunk_size: int, k: int, rng):
    """(fact, question, answer, passages) for each of `facts` whose k passages, retrieved from the
    world's own small database, state it (the reader must never learn to answer without reading);
    the passages in a random order, so the answer's is not always the first."""
    from step5_retro.database import build_database

    titles, documents = book_documents(world)
    db = build_database(documents, tokenizer, None, chunk_size=chunk_size, k=1, titles=titles)
    asked = [ask(fact, rng) for fact in facts]
    ids, _ = db.search([question for question, _ in asked], k)
    for fact, (question, answer), row in zip(facts, asked, ids):
        passages = [db.passage(i) for i in row if i >= 0]
        if any(holds_fact(p, world, fact) for p in passages):
            rng.shuffle(passages)
            yield fact, question, answer, passages


def open_book_record(fact, question: str, answer: str, passages: list[str], **fields) -> dict:
    """One open-book conversation: the passages and the question, then the answer in step 4's words."""
    return {"task": "open_book", "kind": fact.relation, **fields, "fact": [fact.entity, fact.relation, fact.value],
            "conversations": open_book_messages(question, passages) + [{"role": "assistant", "content": answer}]}


def edited_records(tokenizer, n_examples: int, known, held_out, seed: int, chunk_size: int, k: int) -> list[dict]:
    """`n_examples` open-book conversations about the world the model was trained on, with some of its
    facts edited in the book (edited_world): two questions in three ask for an edited fact, so the
    passage contradicts what the model remembers; the third asks for a fact left as it was, so the
    lesson is "say what the passage says", not "avoid what you remember". held_out facts (the ones the
    evaluation asks about) are never edited nor asked."""
    rng, records, round_ = random.Random(seed), [], 0
    held_out = set(held_out)
    while len(records) < n_examples:
        round_ += 1
        if round_ > 50 and not records:  # retrieval never finds an asked fact: say so instead of looping
            raise UserError(f"edited_records: no question's passages held its answer in 50 books "
                            f"(chunk_size {chunk_size}, k {k}); use larger chunks or more passages")
        world, edited = edited_world(known, rng, held_out)
        unchanged = [f for f in world.facts if f not in edited and (f.entity, f.relation) not in held_out]
        facts = edited + rng.sample(unchanged, min(len(unchanged), len(edited) // 2))
        rng.shuffle(facts)
        for fact, question, answer, passages in answerable_questions(world, facts, tokenizer, chunk_size, k, rng):
            records.append(open_book_record(fact, question, answer, passages, world_seed=f"edited-{seed}-{round_}",
                                            renamed=False, edited=fact in edited))
            if len(records) == n_examples:
                break
    return records


def open_book_records(tokenizer, n_examples: int, seed: int = 0, chunk_size: int = 32, k: int = 2,
                      avoid=(), first_world: int = 1000, size: str = "quick", known=None,
                      known_share: float = 0.0, edited_share: float = 0.0, held_out=()) -> list[dict]:
    """`n_examples` conversations {"task": "open_book", "kind", "world_seed", "fact", "conversations"}:
    passages retrieved from a re-drawn world's database, a question, the answer in step 4's words.
    Worlds that would name any of `avoid` (the database-only newcomers) are skipped; so is a question
    whose passages do not hold its answer (the reader must never learn to answer without reading).
    The passages come in a random order, so the answer's passage is not always the first.
    known_share: this share of the worlds is renamed to the entities of `known` (the world the model
    was pretrained on): its names with made-up facts, so the passages disagree with what the model
    remembers and only reading gets the answer (the lesson an edited database needs).
    edited_share: this share of the conversations is about `known` itself with facts edited in its
    book (edited_records), none of `held_out`."""
    if edited_share and known is None:
        raise UserError("open_book_records: edited_share needs the world the model was trained on (known)")
    n_edited = round(edited_share * n_examples)
    rng, records, world_seed = random.Random(seed), [], first_world + 10_000 * seed
    avoid = set(avoid)
    while len(records) < n_examples - n_edited:
        world_seed += 1
        world = build_world(world_seed, size)
        renamed = known is not None and rng.random() < known_share
        if renamed:
            world = renamed_world(world, known, rng)
        if avoid & set(world.entities):
            continue
        facts = rng.sample(world.facts, len(world.facts))
        for fact, question, answer, passages in answerable_questions(world, facts, tokenizer, chunk_size, k, rng):
            records.append(open_book_record(fact, question, answer, passages, world_seed=world_seed,
                                            renamed=renamed))
            if len(records) == n_examples - n_edited:
                break
    if n_edited:
        records += edited_records(tokenizer, n_edited, known, held_out, seed, chunk_size, k)
        rng.shuffle(records)
    return records


def answer(model, tokenizer, question: str, passages: list[str] | None = None,
           max_new_tokens: int = ANSWER_TOKENS, free: bool = False) -> str:
    """A chat model's greedy reply: closed book (passages None) or with the passages before the question.
    With passages it writes only the book's words (book_words) unless free is True."""
    from step4_sft.chat import reply

    if passages is None:
        return reply(model, tokenizer, [{"role": "user", "content": question}], max_new_tokens=max_new_tokens)
    allowed = None if free else book_words(tokenizer, question, passages, model.config.vocab_size)
    return reply(model, tokenizer, open_book_messages(question, passages), max_new_tokens=max_new_tokens,
                 allowed=allowed)


def book_words(tokenizer, question: str, passages: list[str], vocab_size: int):
    """The tokens an open-book reader may write, as a (vocab_size,) bool mask: those of its passages and
    its question, the words every answer is written in (answer_template_ids) and <|im_end|>.
    Everything else is masked before the argmax: a value the passages do not hold cannot be written,
    however sure the weights are of it (the reader's weights win over the book otherwise: EXPERIMENTS.md)."""
    import torch

    ids = {tokenizer.im_end_id, *answer_template_ids(tokenizer), *tokenizer.encode_ordinary(question)}
    for passage in passages:
        ids.update(tokenizer.encode_ordinary(passage))
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[sorted(ids)] = True
    return allowed


def answer_template_ids(tokenizer) -> set[int]:
    """Token ids of the words the answers are written in ("lives in", "'s favorite color is", ...):
    each word of every answer template in QUESTIONS, placeholders removed, as it is written inside a
    sentence (after a space; "'s" and the full stop right after a word)."""
    ids = set()
    for _, template in QUESTIONS.values():
        words = re.sub(r"\{\w+\}", " ", template).replace("'s", " 's ").replace(".", " . ").split()
        for word in words + ["a", "an"]:  # {a_v} is "a cook" or "an owl"
            ids.update(tokenizer.encode_ordinary(word if word in ("'s", ".") else " " + word))
    return ids


def edit_book(db, edits: list[dict]) -> dict:
    """Rewrite facts in a database that build_db.py made from the world: edits are
    [{"entity", "relation", "value"}, ...]. Every fact sheet that states an edited fact is rewritten
    (the entity's own, and the sheet of a town, person or creature it points at); only those documents
    are re-chunked, re-embedded and re-indexed (Database.edit_documents). No model weight changes."""
    info = db.meta.get("world")
    if not info:
        raise UserError(f"{db.out_dir or 'this database'} was not built from the world by build_db.py, "
                        "so there are no facts to edit; run python step5_retro/build_db.py")
    world = extended_world(quick=info["size"] == "quick", seed=info["seed"])[0]
    overrides = {(e, r): v for e, r, v in info["overrides"]}
    for number, edit in enumerate(edits, start=1):
        if not isinstance(edit, dict) or set(edit) != {"entity", "relation", "value"}:
            raise UserError(f"edit {number}: expected an object with exactly the keys entity, relation, value, "
                            f'e.g. {{"entity": "Halra", "relation": "lives_in", "value": "{world.names("place")[0]}"}}')
        if edit["entity"] not in world.entities:
            raise UserError(f"edit {number}: unknown entity {edit['entity']!r} (the database's world has "
                            f"{len(world.entities)} entities, e.g. {', '.join(world.names()[:3])})")
        overrides[edit["entity"], edit["relation"]] = edit["value"]
    apply_overrides(world, overrides)  # an unknown relation or a value of the wrong kind: a UserError
    titles, documents = book_documents(world, overrides)
    changes = {i: text for i, text in enumerate(documents) if text != db.documents[i]}
    info["overrides"] = [[e, r, v] for (e, r), v in overrides.items()]
    return {"documents_rewritten": sorted(titles[i] for i in changes), **db.edit_documents(changes)}


def answer_value(reply: str, relation: str) -> str:
    """The short answer in a reply written in step 4's words: "Halra lives in Evergate." -> "Evergate".
    The value is what the question asks for (SQuAD scores such a span, not the sentence around it);
    a reply that is not in the answer's wording is returned whole (and will not match)."""
    template = re.escape(QUESTIONS[relation][1]).replace(r"\{e\}", "(?:.+?)")
    template = template.replace(r"\{a_v\}", r"(?:an?\ )?(?P<v>.+?)").replace(r"\{v\}", "(?P<v>.+?)")
    match = re.fullmatch(template.removesuffix(r"\.") + r"\.?", reply.strip())
    return match.group("v") if match else reply
