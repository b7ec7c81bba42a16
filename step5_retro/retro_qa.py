"""Questions to a Retro model (sft_retro.py, eval_retrieval.py, ask.py --retro): step 4's chat template,
the prompt left-padded so that the answer starts on a chunk boundary, and the question's neighbours.

RETRO's QA left-padding. CCA lets a position read chunk u's neighbours only from the last token of chunk
u on (the m-1 shift, retro_model.py). So the prompt is padded on the left with <|endoftext|> until the
first answer token sits on a chunk boundary (position % m == 0): the position that writes it is then the
last token of the chunk that ends the prompt, and every answer token reads neighbours retrieved with the
whole question in view:

    [pad ... pad <|im_start|>user Where does Halra live?<|im_end|> <|im_start|>assistant\n][Halra lives in ...
     chunks 0 to u: the prompt, padded on the left to fill them                             chunk u+1 on: the answer
    the last token of chunk u ("\n") writes "Halra", and is the first position that reads chunk u's neighbours

The question's neighbours: its k best passages (a chunk and its continuation, RETRO's neighbour) in its
world's library, given to every chunk of the row. The question is compared with the whole passage, not
with the chunk alone as RETRO's key is: at 16 tokens a chunk often holds the entity's name but not the
fact asked about, and its continuation does (EXPERIMENTS.md measures the recall of both).

    ids, mask = qa_example(tokenizer, "Where does Halra live?", "Halra lives in Evergate.", chunk_size=16)
    chunk_ids, scores = question_neighbours(library, ["Where does Halra live?"], k=2)   # (1, 2) each
    split, items = qa_split(range(500_000, 500_300), tokenizer, chunk_size=16, k=2, block_size=256)
    reply = retro_answer(model, tokenizer, "Where does Halra live?", passages(library, chunk_ids[0], eot))
"""
import random

import numpy as np
import torch
from tqdm import tqdm

from common.cli import UserError
from common.model import IGNORE_INDEX
from common.world.world import ask, build_world
from step4_sft.chat_template import decode_reply, encode_conversation, encode_prompt, shift_labels
from step5_retro.book import ANSWER_TOKENS, holds_fact
from step5_retro.database import build_database
from step5_retro.retro_data import EMBEDDER, RetroSplit, passages, recipe, world_library

QA_SEED0 = 500_000  # instruction-tuning worlds: seeds that neither pretraining nor validation (retro_data) uses
MAKE_SFT_RETRO = "python step5_retro/sft_retro.py"


# ----------------------------------------------------------------------------- the prompt

def lead_padding(prompt_len: int, chunk_size: int) -> int:
    """Padding tokens that put the token after a prompt of prompt_len tokens on a chunk boundary."""
    return -prompt_len % chunk_size


def qa_example(tokenizer, question: str, answer: str, chunk_size: int) -> tuple[list[int], list[int]]:
    """(ids, mask) of one question and its answer in step 4's template, with step 4's answer-only mask,
    left-padded (mask 0) so that the first answer token sits on a chunk boundary."""
    ids, mask = encode_conversation(tokenizer, [{"role": "user", "content": question},
                                                {"role": "assistant", "content": answer}])
    lead = lead_padding(mask.index(1), chunk_size)
    return [tokenizer.eot_id] * lead + ids, [0] * lead + mask


def qa_prompt(tokenizer, question: str, chunk_size: int) -> list[int]:
    """What the model reads before it answers: qa_example's ids up to the answer, padded the same way."""
    ids = encode_prompt(tokenizer, [{"role": "user", "content": question}])
    return [tokenizer.eot_id] * lead_padding(len(ids), chunk_size) + ids


# ----------------------------------------------------------------------------- the neighbours

def question_neighbours(library, questions, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(chunk ids, scores), each (n, k): the k passages of `library` (a database.py Database) nearest to
    each question, by the library's embedder; a passage is a live chunk and its continuation."""
    alive = np.flatnonzero(library.alive)
    if not 1 <= k <= len(alive):
        raise UserError(f"k={k} neighbours asked, but the library holds {len(alive)} chunks; pass a smaller k")
    blank = np.zeros(0, dtype=library.chunks.dtype)
    keys = library.embedder.embed([np.concatenate([library.chunks[i], library.chunks[library.continuation[i]]
                                                   if library.continuation[i] >= 0 else blank]) for i in alive])
    scores = library.embed(list(questions)) @ keys.T
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return alive[best], np.take_along_axis(scores, best, axis=1)


def library_for(db, tokenizer, retro):
    """A database (database.py) as a Retro model reads it: its documents cut into the model's chunk size and
    embedded like the training libraries (the database itself where it already is)."""
    if (db.chunk_size, db.meta["embedder"]) == (retro.chunk_size, EMBEDDER):
        return db
    return build_database(db.documents, tokenizer, None, chunk_size=retro.chunk_size, embedder=EMBEDDER, k=retro.k,
                          titles=db.titles)


def world_questions(world, library, k: int, rng: random.Random) -> list[dict]:
    """One question about each fact of the world (its phrasing drawn by rng), with its neighbours:
    {"world", "fact", "question", "answer", "chunks": k chunk ids, "holds": a neighbour states the fact}."""
    asked = [ask(fact, rng) for fact in world.facts]
    found, _ = question_neighbours(library, [question for question, _ in asked], k)
    return [{"world": world.seed, "fact": fact, "question": question, "answer": answer, "chunks": row,
             "holds": any(holds_fact(library.passage(i), world, fact) for i in row)}
            for fact, (question, answer), row in zip(world.facts, asked, found)]


def every_chunk(tokens: np.ndarray, n_chunks: int) -> np.ndarray:
    """A question's neighbour tokens (..., k, 2m) -> (..., n_chunks, k, 2m): the same for every chunk."""
    return np.repeat(np.expand_dims(tokens, -3), n_chunks, axis=-3)


# ----------------------------------------------------------------------------- the training rows

def qa_split(seeds, tokenizer, chunk_size: int, k: int, block_size: int, answerable_only: bool = True,
             progress: bool = True) -> tuple[RetroSplit, list[dict]]:
    """Questions about the worlds build_world(seed, "quick") as a RetroSplit (one question a row, left-padded,
    right-padded to one length; scored targets: the answer and its <|im_end|>), and the items behind the rows.
    answerable_only: leave out questions whose neighbours do not state the answer (for training: a model
    must never learn to answer without reading)."""
    seeds, pad = list(seeds), tokenizer.eot_id
    worlds, examples, too_long = [], [], 0
    for seed in tqdm(seeds, desc="question worlds", unit="world", disable=not progress, leave=False):
        world = build_world(seed, "quick")
        library = world_library(world, tokenizer, chunk_size, k)
        kept = []
        for it in world_questions(world, library, k, random.Random(seed)):
            example = qa_example(tokenizer, it["question"], it["answer"], chunk_size)
            if len(example[0]) > block_size + 1:  # one token is lost to the shift
                too_long += 1
            elif it["holds"] or not answerable_only:
                kept.append(it)
                examples.append(example)
        worlds.append((kept, library))
    if not examples:
        raise UserError(f"no question of worlds {seeds[0]}..{seeds[-1]} fits the model's block_size {block_size} "
                        f"with its answer{' among its neighbours' if answerable_only else ''}")
    if too_long and progress:
        print(f"{too_long} questions left out: with their answers they are longer than block_size {block_size}")
    T = min(block_size, -(-(max(len(ids) for ids, _ in examples) - 1) // chunk_size) * chunk_size)  # whole chunks
    ids = np.full((len(examples), T + 1), pad, dtype=np.int64)
    mask = np.zeros((len(examples), T + 1), dtype=np.int64)
    for row, (example_ids, example_mask) in enumerate(examples):
        ids[row, :len(example_ids)], mask[row, :len(example_mask)] = example_ids, example_mask
    _, targets = shift_labels(torch.from_numpy(ids), torch.from_numpy(mask))  # step 4's shift: the one place
    scored = (targets != IGNORE_INDEX).numpy()
    rng = np.random.default_rng(seeds[0])
    neighbours, random_neighbours = [], []
    for i, (items, library) in enumerate(worlds):
        chunk_ids = np.array([it["chunks"] for it in items], dtype=np.int64).reshape(len(items), k)
        neighbours.append(every_chunk(passages(library, chunk_ids, pad), T // chunk_size))
        other = worlds[(i + 1) % len(worlds)][1]  # another world's library: the same kind of text, no answer
        random_ids = rng.integers(0, len(other.chunks), size=chunk_ids.shape)
        random_neighbours.append(every_chunk(passages(other, random_ids, pad), T // chunk_size))
    items = [it for world_items, _ in worlds for it in world_items]
    split = RetroSplit(rows=ids, neighbours=np.concatenate(neighbours),
                       random_neighbours=np.concatenate(random_neighbours), fact=scored, scored=scored,
                       world=np.array([it["world"] for it in items]),
                       meta=recipe(seeds, tokenizer, T, chunk_size, k, "questions", "quick"))
    return split, items


# ----------------------------------------------------------------------------- answering

@torch.no_grad()
def retro_generate(model, ids: list[int], neighbours, max_new_tokens: int, stop: int) -> list[int]:
    """Greedy new tokens after ids, every chunk reading `neighbours` (k, 2m) token ids (None: retrieval off),
    until `stop` (not returned) or max_new_tokens. The whole row is read again for every token (no cache:
    answers are short, and CCA's groups move with the row)."""
    device = next(model.parameters()).device
    m, new = model.retro.chunk_size, []
    table = None if neighbours is None else torch.as_tensor(np.asarray(neighbours), device=device)
    for _ in range(min(max_new_tokens, model.config.block_size - len(ids))):
        idx = torch.tensor([ids + new], device=device)
        rows = None if table is None else table[None, None].expand(1, max(1, idx.size(1) // m), *table.shape)
        logits, _ = model(idx, neighbours=rows)
        token = int(logits[0, -1].argmax())
        if token == stop:
            break
        new.append(token)
    return new


def retro_answer(model, tokenizer, question: str, neighbours, max_new_tokens: int = ANSWER_TOKENS) -> str:
    """The Retro model's greedy reply to a question, reading `neighbours` (k, 2m) (None: retrieval off)."""
    prompt = qa_prompt(tokenizer, question, model.retro.chunk_size)
    return decode_reply(tokenizer, retro_generate(model, prompt, neighbours, max_new_tokens, tokenizer.im_end_id))


def answer_attention(model, ids: list[int], start: int, neighbours) -> np.ndarray:
    """(len(ids) - start, k*2m): for each answer token ids[start:], how much the position that wrote it read
    each neighbour token, averaged over the CCA layers and their heads (needs start >= m: a chunk before)."""
    m = model.retro.chunk_size
    table = torch.as_tensor(np.asarray(neighbours), device=next(model.parameters()).device)
    idx = torch.tensor([ids], device=table.device)
    probs = torch.stack(model.cca_attention(idx, table[None, None].expand(1, len(ids) // m, *table.shape)))
    probs = probs.mean(dim=(0, 3))[0]  # layers and heads: (L, m, k*r)
    writers = np.arange(start - 1, len(ids) - 1)  # position t writes token t+1
    return probs[(writers - m + 1) // m, (writers - m + 1) % m].cpu().numpy()
