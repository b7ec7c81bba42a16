"""The retrieval database: documents cut into token chunks, embedded, and indexed with faiss.

RETRO's database (and Megatron-LM's tools/retro) in small: each document is tokenized and cut into
chunks of `chunk_size` tokens that never cross a document (a document's last chunk is padded with
<|endoftext|>); each chunk is embedded by a frozen embedder and stored in a faiss index; and for every
chunk its k nearest chunks from OTHER documents are stored as a neighbour table (RETRO's rule: a
chunk that may retrieve its own document retrieves its own future).

    db = build_database(documents, tokenizer, "out/step5/db", chunk_size=32, embedder="tfidf",
                        index="Flat", k=2)                      # out_dir=None: in memory only
    db = load_database("out/step5/db", tokenizer, chunk_size=32)  # another tokenizer or size: UserError
    db.chunks         (n_chunks, chunk_size) int64 token ids
    db.chunk_doc      (n_chunks,) the document each chunk comes from;  db.chunk_pos: its place there
    db.continuation   (n_chunks,) the next chunk of the same document, or -1 (RETRO's "continuation")
    db.neighbours     (n_chunks, k) each chunk's nearest chunks of other documents (-1: none found)
    db.alive          (n_chunks,) False for chunks an edit replaced (they are out of the index)
    db.documents, db.titles    the documents' texts and names;  db.meta: what every reader checks
    ids, scores = db.search(["Where does Halra live?"], k=2, exclude_docs=None)   # (n, k) arrays
    db.chunk_text(i); db.passage(i)    # a chunk's text; the chunk and its continuation
    db.edit_documents({doc: new_text})  # re-chunk, re-embed and re-index only those documents

Two embedders (choose with embedder=): "tfidf", a bag of tokens weighted by inverse document frequency
(counted over chunks) and L2-normalised; and "model", the frozen step-3 model's final hidden states
averaged over the chunk's tokens. Cosine similarity is the inner product of unit vectors, so every
index is built for METRIC_INNER_PRODUCT: "Flat" is exact; any faiss factory string ("IVF64,Flat",
"IVF64,PQ8", ...) is trained on a sample of the vectors first, as Megatron does.
"""
import hashlib
import json
import os
import pathlib
import re
import tempfile

import faiss
import numpy as np
import torch
from tqdm import tqdm

from common.checkpoint import atomic_write_text
from common.cli import UserError, next_command

BUILD_DB = "python step5_retro/build_db.py"
EMBEDDERS = ("tfidf", "model")
ARRAYS = ("chunks", "chunk_doc", "chunk_pos", "continuation", "neighbours", "alive")
MAX_TRAIN_VECTORS = 20_000   # an index is trained on at most this many sampled vectors
FAISS_POINTS_PER_CENTROID = 39  # faiss warns below this many training vectors per IVF list
PQ_CODES = 256               # a PQ sub-quantiser of 8 bits (faiss's default) has 256 centroids to train


def tokenizer_sha(tokenizer) -> str:
    """The fingerprint of a tokenizer object: equal to step1_tokenizer.bpe.tokenizer_fingerprint of the
    file it was saved to (Tokenizer.save writes exactly these bytes)."""
    text = json.dumps(tokenizer.to_dict(), ensure_ascii=False, indent=1) + "\n"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- chunks

def chunk_documents(token_lists: list[list[int]], chunk_size: int, pad_id: int, first_doc: int = 0) -> dict:
    """Cut each document into chunks of chunk_size tokens, the last one padded: never across documents.
    Returns the arrays chunks, chunk_doc, chunk_pos and continuation (ids counted from 0)."""
    chunks, doc_of, pos_of, continuation = [], [], [], []
    for doc, ids in enumerate(token_lists, start=first_doc):
        ids = list(ids) or [pad_id]  # an empty document still owns one (all-padding) chunk
        n = -(-len(ids) // chunk_size)
        for pos in range(n):
            piece = ids[pos * chunk_size:(pos + 1) * chunk_size]
            chunks.append(piece + [pad_id] * (chunk_size - len(piece)))
            doc_of.append(doc)
            pos_of.append(pos)
            continuation.append(len(chunks) if pos < n - 1 else -1)  # the next chunk's id, or none
    return {"chunks": np.array(chunks, dtype=np.int64).reshape(-1, chunk_size),
            "chunk_doc": np.array(doc_of, dtype=np.int64), "chunk_pos": np.array(pos_of, dtype=np.int64),
            "continuation": np.array(continuation, dtype=np.int64)}


# ----------------------------------------------------------------------------- embedders

class TfidfEmbedder:
    """Bag of tokens: count of each token times log-scaled inverse chunk frequency, L2-normalised.
    Padding is not a token of the text and is left out. The idf is fixed when the database is built."""
    name = "tfidf"

    def __init__(self, vocab_size: int, pad_id: int, idf: np.ndarray | None = None):
        self.dim = -(-vocab_size // 16) * 16  # a multiple of 16, so product quantisers (PQ8, PQ16) fit
        self.pad_id, self.idf = pad_id, idf

    def fit(self, chunks: np.ndarray) -> "TfidfEmbedder":
        present = np.zeros((len(chunks), self.dim), dtype=bool)
        present[np.arange(len(chunks))[:, None], chunks] = True
        df = present.sum(0)
        self.idf = (np.log((1 + len(chunks)) / (1 + df)) + 1).astype(np.float32)  # smoothed, as scikit-learn
        return self

    def embed(self, token_lists, progress: bool = False) -> np.ndarray:
        vectors = np.zeros((len(token_lists), self.dim), dtype=np.float32)
        for row, ids in enumerate(tqdm(token_lists, desc="embed (tfidf)", disable=not progress, leave=False)):
            ids = [int(i) for i in ids if int(i) != self.pad_id]
            np.add.at(vectors[row], ids, 1.0)
        vectors *= self.idf
        return _unit(vectors)

    def state(self) -> dict:
        return {"idf": self.idf}


class ModelEmbedder:
    """The frozen language model's final hidden states (after its last norm), averaged over the text's
    tokens (padding left out) and L2-normalised."""
    name = "model"

    def __init__(self, checkpoint, pad_id: int, batch_size: int = 64):
        from common.checkpoint import load_model

        self.checkpoint = str(checkpoint)
        self.model = load_model(checkpoint, "cpu", hint="python step3_pretrain/train_pretrain.py")
        self.dim, self.pad_id, self.batch_size = self.model.config.n_embd, pad_id, batch_size

    @torch.no_grad()
    def embed(self, token_lists, progress: bool = False) -> np.ndarray:
        captured = {}
        hook = self.model.norm.register_forward_hook(lambda module, inputs, output: captured.update(h=output))
        out, window = [], self.model.config.block_size
        try:
            starts = range(0, len(token_lists), self.batch_size)
            for first in tqdm(starts, desc="embed (model)", disable=not progress, leave=False):
                rows = [[int(i) for i in ids if int(i) != self.pad_id][:window] or [self.pad_id]
                        for ids in token_lists[first:first + self.batch_size]]
                longest = max(len(r) for r in rows)
                idx = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
                keep = torch.zeros((len(rows), longest, 1))
                for i, r in enumerate(rows):
                    idx[i, :len(r)], keep[i, :len(r)] = torch.tensor(r), 1.0
                self.model(idx)
                out.append(((captured["h"] * keep).sum(1) / keep.sum(1)).numpy())
        finally:
            hook.remove()
        return _unit(np.concatenate(out).astype(np.float32))

    def state(self) -> dict:
        return {}


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def file_sha(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the index

def make_index(vectors: np.ndarray, index_string: str = "Flat", nprobe: int = 8, seed: int = 0):
    """A faiss index over the unit vectors, ids = row numbers: built from the factory string,
    trained on a sample when it needs training (IVF, PQ), then filled. Wrapped in IndexIDMap2,
    so an edit can remove and add chunks by their ids."""
    lists = re.search(r"IVF(\d+)", index_string)
    if lists and len(vectors) < int(lists.group(1)):
        n = int(lists.group(1))
        raise UserError(f"--index {index_string}: {len(vectors)} training vectors for {n} IVF lists; faiss needs "
                        f"at least as many vectors as lists (ideally {FAISS_POINTS_PER_CENTROID} times as many): "
                        f"pass a smaller count, e.g. --index IVF{max(1, len(vectors) // FAISS_POINTS_PER_CENTROID)}"
                        f"{index_string[lists.end():]}")
    if re.search(r"PQ\d+", index_string) and len(vectors) < PQ_CODES:
        raise UserError(f"--index {index_string}: {len(vectors)} training vectors, but a product quantiser learns "
                        f"{PQ_CODES} codes per sub-vector and needs at least that many; store more documents, "
                        f"or use an index without PQ, e.g. --index Flat")
    try:
        index = faiss.index_factory(vectors.shape[1], index_string, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            sample = vectors[rng.permutation(len(vectors))[:MAX_TRAIN_VECTORS]]
            index.train(sample)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1][:200]
        raise UserError(f"--index {index_string!r}: faiss cannot build it for {len(vectors)} vectors of "
                        f"dimension {vectors.shape[1]} ({reason}); try --index Flat") from None
    index = faiss.IndexIDMap2(index)
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    set_nprobe(index, nprobe)
    return index


def set_nprobe(index, nprobe: int) -> None:
    """How many IVF lists a search visits (more: slower, closer to exact). No-op for other indexes."""
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:  # not an IVF index
        pass


def write_index_atomically(index, path) -> None:
    """faiss.write_index to a temporary file in the same folder, then rename: never a half-written index."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_array_atomically(array: np.ndarray, path) -> None:
    from common.checkpoint import _atomic_write  # the project's one temp-file-then-rename

    _atomic_write(path, lambda f: np.save(f, array))


# ----------------------------------------------------------------------------- the database

class Database:
    """Chunks, their documents, the index and the neighbour table; see the module docstring."""

    def __init__(self, tokenizer, arrays: dict, documents: list[str], titles: list[str], meta: dict,
                 embedder, index, out_dir=None):
        self.tokenizer, self.documents, self.titles, self.meta = tokenizer, documents, titles, meta
        for name in ARRAYS:
            setattr(self, name, arrays[name])
        self.embedder, self.index = embedder, index
        self.out_dir = pathlib.Path(out_dir) if out_dir is not None else None

    @property
    def chunk_size(self) -> int:
        return self.meta["chunk_size"]

    @property
    def k(self) -> int:
        return self.meta["k"]

    def __len__(self) -> int:
        return len(self.chunks)

    def chunk_text(self, i: int) -> str:
        return self.tokenizer.decode([t for t in self.chunks[i] if t != self.tokenizer.eot_id])

    def passage(self, i: int) -> str:
        """What a reader is shown for neighbour i: the chunk and its continuation, as RETRO gives them."""
        nxt = self.continuation[i]
        return self.chunk_text(i) + (self.chunk_text(nxt) if nxt >= 0 else "")

    def embed(self, texts_or_token_lists, progress: bool = False) -> np.ndarray:
        token_lists = [self.tokenizer.encode(t) if isinstance(t, str) else t for t in texts_or_token_lists]
        return self.embedder.embed(token_lists, progress)

    def search(self, queries, k: int, exclude_docs=None) -> tuple[np.ndarray, np.ndarray]:
        """The k best chunks for each query (a text or a token list): (ids, scores), each (n, k).
        exclude_docs: one document id per query (or None) whose chunks may not be returned."""
        return self._search(self.embed(queries), k, exclude_docs)

    def _search(self, vectors: np.ndarray, k: int, exclude_docs=None):
        n_alive = int(self.alive.sum())
        if k < 1 or k > n_alive:
            raise UserError(f"k={k} neighbours asked, but the database holds {n_alive} chunks; pass a smaller k")
        extra = 0 if exclude_docs is None else int(np.bincount(self.chunk_doc[self.alive]).max())
        found_scores, found_ids = self.index.search(vectors, min(k + extra, n_alive))
        ids = np.full((len(vectors), k), -1, dtype=np.int64)
        scores = np.full((len(vectors), k), -np.inf, dtype=np.float32)
        for row in range(len(vectors)):
            banned = None if exclude_docs is None else exclude_docs[row]
            keep = [(i, s) for i, s in zip(found_ids[row], found_scores[row])
                    if i >= 0 and (banned is None or self.chunk_doc[i] != banned)][:k]
            for col, (i, s) in enumerate(keep):
                ids[row, col], scores[row, col] = i, s
        return ids, scores

    def neighbour_rows(self, rows: np.ndarray, k: int) -> np.ndarray:
        """The k nearest chunks of other documents for the chunks `rows` (RETRO's neighbour table)."""
        out = np.full((len(rows), k), -1, dtype=np.int64)
        for first in range(0, len(rows), 1024):
            part = rows[first:first + 1024]
            vectors = self.embedder.embed(self.chunks[part])
            out[first:first + 1024] = self._search(vectors, k, exclude_docs=self.chunk_doc[part])[0]
        return out

    def edit_documents(self, changes: dict[int, str]) -> dict:
        """Replace documents' texts: their old chunks leave the index (kept as rows, alive=False), their
        new chunks are appended, embedded and added; only rows that pointed at a removed chunk and the
        new rows get new neighbours. Nothing else is re-embedded. Saved if the database has a folder."""
        for doc in changes:
            if not 0 <= doc < len(self.documents):
                raise UserError(f"edit: no document {doc} in a database of {len(self.documents)} documents")
        dead = np.flatnonzero(self.alive & np.isin(self.chunk_doc, list(changes)))
        self.alive[dead] = False
        self.index.remove_ids(dead.astype(np.int64))
        docs = sorted(changes)
        new = chunk_documents([self.tokenizer.encode(changes[d]) for d in docs], self.chunk_size,
                              self.tokenizer.eot_id)
        first = len(self.chunks)
        new["chunk_doc"] = np.array(docs, dtype=np.int64)[new["chunk_doc"]]
        new["continuation"] = np.where(new["continuation"] >= 0, new["continuation"] + first, -1)
        added = np.arange(first, first + len(new["chunks"]), dtype=np.int64)
        for name in ("chunks", "chunk_doc", "chunk_pos", "continuation"):
            setattr(self, name, np.concatenate([getattr(self, name), new[name]]))
        self.alive = np.concatenate([self.alive, np.ones(len(added), dtype=bool)])
        self.index.add_with_ids(self.embedder.embed(new["chunks"]), added)
        for d in docs:
            self.documents[d] = changes[d]
        self.neighbours = np.concatenate([self.neighbours, np.full((len(added), self.k), -1, dtype=np.int64)])
        stale = np.flatnonzero(self.alive & (np.isin(self.neighbours, dead).any(1) | (np.arange(len(self)) >= first)))
        self.neighbours[stale] = self.neighbour_rows(stale, self.k)
        self.meta["n_chunks"] = len(self.chunks)
        if self.out_dir is not None:
            self.save()
        return {"removed_chunks": len(dead), "added_chunks": len(added), "new_neighbour_rows": len(stale)}

    def save(self) -> None:
        """Every file written atomically; meta.json last, so a reader never sees a new meta with old arrays."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name in ARRAYS:
            save_array_atomically(getattr(self, name), self.out_dir / f"{name}.npy")
        for name, value in self.embedder.state().items():
            save_array_atomically(value, self.out_dir / f"{name}.npy")
        write_index_atomically(self.index, self.out_dir / "index.faiss")
        records = [{"title": t, "text": d} for t, d in zip(self.titles, self.documents)]
        atomic_write_text(self.out_dir / "documents.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        atomic_write_text(self.out_dir / "meta.json", json.dumps(self.meta, indent=2) + "\n")


def make_embedder(name: str, tokenizer, model_checkpoint=None):
    if name == "tfidf":
        return TfidfEmbedder(tokenizer.vocab_size, tokenizer.eot_id)
    if name == "model":
        if model_checkpoint is None:
            raise UserError("the model embedder needs a checkpoint (--model out/step3/model.pt)")
        return ModelEmbedder(model_checkpoint, tokenizer.eot_id)
    raise UserError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)}")


def build_database(documents: list[str], tokenizer, out_dir=None, chunk_size: int = 32, embedder: str = "tfidf",
                   index: str = "Flat", k: int = 2, nprobe: int = 8, titles: list[str] | None = None,
                   model_checkpoint=None, seed: int = 0, progress: bool = False, extra_meta=None) -> Database:
    """Chunk, embed, index and find neighbours for `documents`; save to out_dir (None: in memory).
    extra_meta: more entries for meta.json (build_db.py records the world the documents describe)."""
    if chunk_size < 1:
        raise UserError(f"chunk_size must be at least 1, not {chunk_size}")
    if not documents:
        raise UserError("build_database: no documents to store")
    titles = list(titles) if titles is not None else [d.split("\n", 1)[0][:40] for d in documents]
    token_lists = [tokenizer.encode(d) for d in tqdm(documents, desc="tokenize", disable=not progress, leave=False)]
    arrays = chunk_documents(token_lists, chunk_size, tokenizer.eot_id)
    n_chunks = len(arrays["chunks"])
    per_doc = int(np.bincount(arrays["chunk_doc"]).max())
    if k < 1 or k > n_chunks - per_doc:
        raise UserError(f"k={k} neighbours from other documents, but the database holds {n_chunks} chunks "
                        f"(up to {per_doc} in one document); pass a k of at most {max(0, n_chunks - per_doc)} "
                        f"or store more documents")
    emb = make_embedder(embedder, tokenizer, model_checkpoint)
    if isinstance(emb, TfidfEmbedder):
        emb.fit(arrays["chunks"])
    vectors = emb.embed(arrays["chunks"], progress)
    meta = {"tokenizer_sha": tokenizer_sha(tokenizer), "vocab_size": tokenizer.vocab_size, "chunk_size": chunk_size,
            "embedder": embedder, "index": index, "nprobe": nprobe, "k": k, "n_chunks": n_chunks,
            "n_documents": len(documents), "dim": int(vectors.shape[1]), **(extra_meta or {})}
    if embedder == "model":
        meta.update(model=str(model_checkpoint), model_sha=file_sha(model_checkpoint))
    db = Database(tokenizer, {**arrays, "alive": np.ones(n_chunks, dtype=bool),
                              "neighbours": np.zeros((n_chunks, k), dtype=np.int64)},
                  list(documents), titles, meta, emb, make_index(vectors, index, nprobe, seed), out_dir)
    db.neighbours = db.neighbour_rows(np.arange(n_chunks), k)
    if out_dir is not None:
        db.save()
    return db


def load_database(out_dir, tokenizer=None, chunk_size: int | None = None, embedder: str | None = None) -> Database:
    """Open a saved database, after checking it was built with this tokenizer (default: out/tokenizer.json),
    this chunk size and this embedder (when given). Any mismatch is a UserError saying what to run."""
    from step1_tokenizer.bpe import load_tokenizer

    out_dir = pathlib.Path(out_dir)
    rebuild = f"run {next_command(BUILD_DB)}"
    if not (out_dir / "meta.json").exists():
        raise UserError(f"{out_dir}: no retrieval database here; {rebuild}")
    meta = json.loads((out_dir / "meta.json").read_text())
    tokenizer = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) \
        else load_tokenizer(tokenizer)
    if tokenizer_sha(tokenizer) != meta["tokenizer_sha"]:
        raise UserError(f"{out_dir} was built with another tokenizer (fingerprint {meta['tokenizer_sha']}, "
                        f"this one is {tokenizer_sha(tokenizer)}); {rebuild} with this tokenizer")
    if chunk_size is not None and chunk_size != meta["chunk_size"]:
        raise UserError(f"{out_dir} was built with chunk size {meta['chunk_size']}, not {chunk_size}; "
                        f"{rebuild} --chunk_size {chunk_size}, or use chunk size {meta['chunk_size']}")
    if embedder is not None and embedder != meta["embedder"]:
        raise UserError(f"{out_dir} was built with the {meta['embedder']} embedder, not {embedder}; "
                        f"{rebuild} --embedder {embedder}")
    try:
        arrays = {name: np.load(out_dir / f"{name}.npy") for name in ARRAYS}
        index = faiss.read_index(str(out_dir / "index.faiss"))
        records = [json.loads(line) for line in (out_dir / "documents.jsonl").read_text().splitlines()]
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{out_dir}: a database file is missing or unreadable ({str(err)[:120]}); {rebuild}") from None
    if len(arrays["chunks"]) != meta["n_chunks"] or arrays["chunks"].shape[1] != meta["chunk_size"]:
        raise UserError(f"{out_dir}: chunks.npy holds {arrays['chunks'].shape} but meta.json says "
                        f"{meta['n_chunks']} chunks of {meta['chunk_size']}; {rebuild}")
    if embedder is None:
        embedder = meta["embedder"]
    if embedder == "tfidf":
        emb = TfidfEmbedder(tokenizer.vocab_size, tokenizer.eot_id, np.load(out_dir / "idf.npy"))
    else:
        model = meta["model"]
        if not pathlib.Path(model).exists() or file_sha(model) != meta["model_sha"]:
            raise UserError(f"{out_dir} was embedded by {model}, which is missing or has changed since; {rebuild}")
        emb = ModelEmbedder(model, tokenizer.eot_id)
    set_nprobe(index, meta["nprobe"])
    return Database(tokenizer, arrays, [r["text"] for r in records], [r["title"] for r in records], meta, emb,
                    index, out_dir)
