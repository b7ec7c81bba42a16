"""The open book: what step 5's database holds, and how a reader is shown what it retrieved.

    world, newcomers = extended_world(quick=False)   # step 3's world plus people/creatures no text names
    titles, documents = book_documents(world)        # one fact sheet per entity (world.documents_about)
    ids, scores = db.search([question], k=2)
    messages = open_book_messages(question, [db.passage(i) for i in ids[0]])   # step 4's chat format

The newcomers (world.add_newcomers) were never in step 3's corpus nor in step 4's conversations:
a right answer about them can only come from the database.
"""
from common.world.world import NEWCOMERS, add_newcomers, build_world, documents_about, phrasings

PASSAGES_HEADER = "Read these passages, then answer the question."


def extended_world(quick: bool = False, seed: int = 0):
    """(world with newcomers, the newcomers' names). seed: the world's seed (step 3's corpus uses 0)."""
    size = "quick" if quick else "default"
    base = build_world(seed, size)
    world = add_newcomers(base, NEWCOMERS[size]["person"], NEWCOMERS[size]["creature"])
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
    lines = [PASSAGES_HEADER] + [f"[{i}] {p.strip()}" for i, p in enumerate(passages, 1)]
    return [{"role": "user", "content": "\n".join(lines) + "\nQuestion: " + question}]
