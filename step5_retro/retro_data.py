"""Retro's training data: many small re-drawn worlds, each with a library of its own fact sheets.

Why: a model that can memorise a fact has no reason to look it up, and a small model trained for
minutes does not learn to copy from its context unless it must (steps 3 and 4). So every world
here is drawn afresh (`build_world(seed, "quick")`: new names, new values) and its text is read
once or twice in training: no value can be memorised, and the only way to predict "Lorenwen is a
healer" is to read Lorenwen's fact sheet among the neighbours.

    world s -> stories and entries (generate_documents)         -> the text rows the model trains on
            -> one fact sheet per entity (documents_about)       -> the world's library (database.py)
    each chunk of m text tokens -> its k nearest library chunks -> neighbours: chunk + continuation

The library is searched per world: names are re-drawn from a small set of syllables, so the same
name recurs in other worlds with other facts, and one global search would hand the model another
world's Lorenwen. Each world is a small database of its own (step5_retro/database.py, TF-IDF, exact
index), as if each story came with its own encyclopedia.

    data = retro_split(range(1000, 1600), tokenizer, block_size=256, chunk_size=32, k=2)
    data.rows (n, T+1)  data.neighbours (n, T // m, k, 2m)  data.random_neighbours  data.fact (n, T)  data.world (n,)
"""
import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from common.world.world import build_world, documents_about, generate_documents
from step5_retro.database import build_database, tokenizer_sha
from step5_retro.retro_model import NO_TOKEN

TRAIN_SEED0 = 1_000     # training worlds are build_world(seed) for seed = 1000, 1001, ...
VAL_SEED0 = 900_000     # validation worlds: seeds no training world uses
EMBEDDER = "tfidf"      # part 1 measured lexical overlap to retrieve best at this scale (README)


@dataclass
class RetroSplit:
    rows: np.ndarray               # (n, T+1) token ids: inputs rows[:, :-1], targets rows[:, 1:]
    neighbours: np.ndarray         # (n, L, k, 2m) each chunk's neighbours (chunk + continuation), NO_TOKEN = none
    random_neighbours: np.ndarray  # (n, L, k, 2m) chunks drawn at random from ANOTHER world's library
    fact: np.ndarray               # (n, T) bool: the target is a token of a fact's value (a name, a colour, ...)
    world: np.ndarray              # (n,) the seed of the world each row comes from
    meta: dict                     # what the table was built from; a model trained on it checks it

    def batch(self, index, random_neighbours: bool = False) -> dict:
        rows = torch.from_numpy(self.rows[index].astype(np.int64))
        table = self.random_neighbours if random_neighbours else self.neighbours
        return {"idx": rows[:, :-1], "targets": rows[:, 1:], "neighbours": torch.from_numpy(table[index])}


def recipe(seeds, tokenizer, block_size: int, chunk_size: int, k: int, docs_per_world: int) -> dict:
    """Everything the split is a pure function of; its hash is the table's fingerprint."""
    seeds = list(seeds)
    meta = {"tokenizer_sha": tokenizer_sha(tokenizer), "chunk_size": chunk_size, "k": k, "embedder": EMBEDDER,
            "block_size": block_size, "docs_per_world": docs_per_world, "world_size": "quick",
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


def world_rows(seed: int, tokenizer, block_size: int, chunk_size: int, k: int, docs_per_world: int):
    """One world: (rows, neighbour chunk ids, fact marks, its library)."""
    world = build_world(seed, "quick")
    library = build_database([documents_about(world, e)[0] for e in world.entities], tokenizer, None,
                             chunk_size=chunk_size, embedder=EMBEDDER, k=k)
    values = {f.value for f in world.facts}
    ids, marks = [], []
    for doc in generate_documents(world, n_docs=docs_per_world, seed=seed):
        doc_ids, doc_marks = encode_marked(tokenizer, doc, values)
        ids += doc_ids + [tokenizer.eot_id]
        marks += doc_marks + [False]
    n = (len(ids) - 1) // block_size
    rows = np.stack([ids[i * block_size:(i + 1) * block_size + 1] for i in range(n)])
    fact = np.stack([marks[i * block_size + 1:(i + 1) * block_size + 1] for i in range(n)])  # marks of targets
    L = block_size // chunk_size
    queries = rows[:, :L * chunk_size].reshape(n * L, chunk_size)
    found, _ = library.search(list(queries), k)
    return rows, found.reshape(n, L, k), fact, library


def retro_split(seeds, tokenizer, block_size: int, chunk_size: int, k: int, docs_per_world: int = 30,
                progress: bool = True) -> RetroSplit:
    """The rows of the worlds `seeds` with their neighbours (see the module docstring)."""
    seeds = list(seeds)
    pad = tokenizer.eot_id
    parts = [world_rows(s, tokenizer, block_size, chunk_size, k, docs_per_world)
             for s in tqdm(seeds, desc="worlds", unit="world", disable=not progress, leave=False)]
    rng = np.random.default_rng(seeds[0])
    neighbours, random_neighbours = [], []
    for i, (rows, found, _, library) in enumerate(parts):
        neighbours.append(passages(library, found, pad))
        other = parts[(i + 1) % len(parts)][3]  # the next world's library: the same kind of text, no answer
        random_neighbours.append(passages(other, rng.integers(0, len(other.chunks), size=found.shape), pad))
    return RetroSplit(rows=np.concatenate([p[0] for p in parts]), neighbours=np.concatenate(neighbours),
                      random_neighbours=np.concatenate(random_neighbours),
                      fact=np.concatenate([p[2] for p in parts]),
                      world=np.concatenate([np.full(len(p[0]), s) for s, p in zip(seeds, parts)]),
                      meta=recipe(seeds, tokenizer, block_size, chunk_size, k, docs_per_world))
