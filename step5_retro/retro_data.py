"""Retro's training data: many small re-drawn worlds, each with a library of its own fact sheets.

Why: a model that can memorise a fact has no reason to look it up, and a small model trained for
minutes does not learn to copy from its context unless it must (steps 3 and 4). So every world
here is drawn afresh (`build_world(seed, "quick")`: new names, new values) and its text is read
about once in training: no value can be memorised, and the only way to predict "Lorenwen is a
healer" is to read Lorenwen's fact sheet among the neighbours.

    world s -> one entry per entity, its name alone in the first chunk -> the text rows the model trains on
            -> one fact sheet per entity (documents_about)          -> the world's library (database.py)
    each chunk of m text tokens -> its k nearest library chunks    -> neighbours: chunk + continuation

Two choices make the neighbours worth reading (step5_retro/EXPERIMENTS.md measures both):
- the text is encyclopedia entries, one per entity, each fact said once: in stories the same
  facts come back in every document of a world, so most of them are already in the context;
- each entry starts on a chunk boundary with its name alone in the first chunk (left-padded, as
  RETRO pads its QA prompts): that chunk retrieves the entity's fact sheet before the first fact.
  Padding is never a scored target.

RETRO-fitting step 3's model needs text it can read: `text="variants"` keeps world 0's entities
(their names and links, which step 3 memorised) and re-draws every other value, so the base model
is confidently wrong about them and only the library is right (see make_world).

The library is searched per world: names are re-drawn from a small set of syllables, so the same
name recurs in other worlds with other facts, and one global search would hand the model another
world's Lorenwen. Each world is a small database of its own (step5_retro/database.py, TF-IDF, exact
index), as if each entry came with its own encyclopedia.

    data = retro_split(range(1000, 1400), tokenizer, block_size=256, chunk_size=16, k=2)
    data.rows (n, T+1)  data.neighbours (n, T // m, k, 2m)  data.random_neighbours
    data.fact, data.scored (n, T)  data.world (n,)
"""
import hashlib
import json
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from common.model import IGNORE_INDEX
from common.world.world import (CREATURE_COLORS, FAVORITE_COLORS, FOODS, KNOWN_FOR, PROFESSIONS, REGIONS, SPECIES,
                                WEATHERS, apply_overrides, build_world, documents_about)
from step5_retro.database import build_database, tokenizer_sha
from step5_retro.retro_model import NO_TOKEN

TRAIN_SEED0 = 1_000     # training worlds are build_world(seed) for seed = 1000, 1001, ...
VAL_SEED0 = 900_000     # validation worlds: seeds no training world uses
EMBEDDER = "tfidf"      # part 1 measured lexical overlap to retrieve best at this scale (README)
TEXTS = ("fresh", "variants")  # re-drawn worlds; or world 0's own entities with re-drawn values
REDRAWN = {"profession": list(PROFESSIONS), "favorite_color": FAVORITE_COLORS, "region": REGIONS,
           "known_for": KNOWN_FOR, "weather": WEATHERS, "species": SPECIES, "color": CREATURE_COLORS, "food": FOODS}


@dataclass
class RetroSplit:
    rows: np.ndarray               # (n, T+1) token ids: inputs rows[:, :-1], targets rows[:, 1:]
    neighbours: np.ndarray         # (n, L, k, 2m) each chunk's neighbours (chunk + continuation), NO_TOKEN = none
    random_neighbours: np.ndarray  # (n, L, k, 2m) chunks drawn at random from ANOTHER world's library
    fact: np.ndarray               # (n, T) bool: the target is a token of a fact's value (a name, a colour, ...)
    scored: np.ndarray             # (n, T) bool: the target is text, not padding (padding carries no loss)
    world: np.ndarray              # (n,) the seed of the world each row comes from
    meta: dict                     # what the table was built from; a model trained on it checks it

    def batch(self, index, random_neighbours: bool = False) -> dict:
        rows = torch.from_numpy(self.rows[index].astype(np.int64))
        targets = rows[:, 1:].masked_fill(~torch.from_numpy(self.scored[index]), IGNORE_INDEX)
        table = self.random_neighbours if random_neighbours else self.neighbours
        return {"idx": rows[:, :-1], "targets": targets, "neighbours": torch.from_numpy(table[index])}


def recipe(seeds, tokenizer, block_size: int, chunk_size: int, k: int, text: str, size: str) -> dict:
    """Everything the split is a pure function of; its hash is the table's fingerprint."""
    seeds = list(seeds)
    meta = {"tokenizer_sha": tokenizer_sha(tokenizer), "chunk_size": chunk_size, "k": k, "embedder": EMBEDDER,
            "block_size": block_size, "text": text, "world_size": "quick" if text == "fresh" else size,
            "seeds": [seeds[0], seeds[-1] + 1] if seeds == list(range(seeds[0], seeds[-1] + 1)) else seeds}
    meta["fingerprint"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return meta


def value_spans(text: str, values) -> list[tuple[int, int]]:
    """Byte spans of every whole-word occurrence of the values in text."""
    data = text.encode("utf-8")
    pattern = re.compile(rb"\b(?:" + b"|".join(re.escape(v.encode()) for v in sorted(values, key=len,
                                                                                      reverse=True)) + rb")\b")
    return [m.span() for m in pattern.finditer(data)]


def encode_marked(tokenizer, doc: str, values) -> tuple[list[int], list[bool]]:
    """Token ids of doc, and for each token whether it lies in a fact value's span."""
    ids = tokenizer.encode(doc)
    ends = np.cumsum([len(tokenizer.token_bytes(t)) for t in ids])
    starts = ends - np.array([len(tokenizer.token_bytes(t)) for t in ids])
    marked = np.zeros(len(ids), dtype=bool)
    for a, b in value_spans(doc, values):
        marked |= (ends > a) & (starts < b)  # " orange" overlaps "orange": the value's own token
    return ids, marked.tolist()


def passages(library, chunk_ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Library chunk ids (..., k) -> their tokens and their continuations' (..., k, 2m); padding is NO_TOKEN."""
    chunks = library.chunks
    blank = np.full(chunks.shape[1], pad_id, dtype=np.int64)
    table = np.stack([np.concatenate([chunks[i], chunks[library.continuation[i]] if library.continuation[i] >= 0
                                      else blank]) for i in chunk_ids.reshape(-1)])
    table[table == pad_id] = NO_TOKEN  # database.py pads chunks with <|endoftext|>; here, nothing
    return table.reshape(*chunk_ids.shape, -1)


def chunk_aligned(tokenizer, title: str, body: str, values, chunk_size: int):
    """A document laid out on chunk boundaries: its title line left-padded to fill whole chunks (RETRO's
    QA left-padding), then its body and <|endoftext|>, padded to whole chunks. The title chunk retrieves
    the entity's fact sheet, and every token of the body may read it.
    Returns token ids, fact marks and padding marks (padding is never a scored target)."""
    title_ids, title_marks = encode_marked(tokenizer, title + "\n", values)
    body_ids, body_marks = encode_marked(tokenizer, body, values)
    body_ids, body_marks = body_ids + [tokenizer.eot_id], body_marks + [False]
    lead = -len(title_ids) % chunk_size
    tail = -len(body_ids) % chunk_size
    ids = [tokenizer.eot_id] * lead + title_ids + body_ids + [tokenizer.eot_id] * tail
    marks = [False] * lead + title_marks + body_marks + [False] * tail
    pads = [True] * lead + [False] * (len(title_ids) + len(body_ids)) + [True] * tail
    return ids, marks, pads


def world_documents(world, seed: int) -> list[tuple[str, str]]:
    """(title, body): one encyclopedia entry per entity, titled with its name, in random order:
    every fact said once, in varied words."""
    docs = []
    for e in world.entities:
        entry = documents_about(world, e, n_docs=2, seed=seed)[1]
        docs.append((e, entry[len(e) + 1:] if entry.startswith(e + "\n") else entry))
    random.Random(seed).shuffle(docs)
    return docs


def make_world(seed: int, text: str = "fresh", size: str = "quick"):
    """"fresh": build_world(seed), new names and values. "variants": world 0 of `size` (the world step 3
    read) with every value that is not a name re-drawn: a model that memorised world 0 knows the names
    but is wrong about most values, which only the library has right (for RETRO-fitting step 3's model)."""
    if text == "fresh":
        return build_world(seed, "quick")
    world, rng = build_world(0, size), random.Random(seed)
    return apply_overrides(world, {(f.entity, f.relation): rng.choice(REDRAWN[f.relation])
                                   for f in world.facts if f.relation in REDRAWN})


def world_library(world, tokenizer, chunk_size: int, k: int):
    """The world's library: one fact sheet per entity, titled with its name, chunked, embedded and indexed
    (a small database.py database in memory)."""
    return build_database([documents_about(world, e)[0] for e in world.entities], tokenizer, None,
                          chunk_size=chunk_size, embedder=EMBEDDER, k=k, titles=list(world.entities))


def world_rows(seed: int, tokenizer, block_size: int, chunk_size: int, k: int, text: str, size: str):
    """One world: (rows, neighbour chunk ids, fact marks, scored marks, its library)."""
    world = make_world(seed, text, size)
    library = world_library(world, tokenizer, chunk_size, k)
    values = {f.value for f in world.facts}
    ids, marks, pads = [], [], []
    for title, body in world_documents(world, seed):
        doc_ids, doc_marks, doc_pads = chunk_aligned(tokenizer, title, body, values, chunk_size)
        ids, marks, pads = ids + doc_ids, marks + doc_marks, pads + doc_pads
    n = (len(ids) - 1) // block_size
    rows = np.stack([ids[i * block_size:(i + 1) * block_size + 1] for i in range(n)])
    fact = np.stack([marks[i * block_size + 1:(i + 1) * block_size + 1] for i in range(n)])  # marks of targets
    scored = ~np.stack([pads[i * block_size + 1:(i + 1) * block_size + 1] for i in range(n)])
    L = block_size // chunk_size
    queries = rows[:, :L * chunk_size].reshape(n * L, chunk_size)
    found, _ = library.search(list(queries), k)
    return rows, found.reshape(n, L, k), fact & scored, scored, library


def retro_split(seeds, tokenizer, block_size: int, chunk_size: int, k: int, text: str = "fresh",
                size: str = "quick", progress: bool = True) -> RetroSplit:
    """The rows of the worlds `seeds` with their neighbours (see the module docstring and make_world)."""
    seeds = list(seeds)
    pad = tokenizer.eot_id
    parts = [world_rows(s, tokenizer, block_size, chunk_size, k, text, size)
             for s in tqdm(seeds, desc="worlds", unit="world", disable=not progress, leave=False)]
    rng = np.random.default_rng(seeds[0])
    neighbours, random_neighbours = [], []
    for i, (rows, found, _, _, library) in enumerate(parts):
        neighbours.append(passages(library, found, pad))
        other = parts[(i + 1) % len(parts)][-1]  # the next world's library: the same kind of text, no answer
        random_neighbours.append(passages(other, rng.integers(0, len(other.chunks), size=found.shape), pad))
    return RetroSplit(rows=np.concatenate([p[0] for p in parts]), neighbours=np.concatenate(neighbours),
                      random_neighbours=np.concatenate(random_neighbours),
                      fact=np.concatenate([p[2] for p in parts]), scored=np.concatenate([p[3] for p in parts]),
                      world=np.concatenate([np.full(len(p[0]), s) for s, p in zip(seeds, parts)]),
                      meta=recipe(seeds, tokenizer, block_size, chunk_size, k, text, size))
