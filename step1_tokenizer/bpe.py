"""Byte-level BPE (byte pair encoding), written from scratch.

A tokenizer turns text into a list of integers (token ids) that a model can
read, and back. This one works in three layers:

1. Bytes. Text is UTF-8 encoded, so ids 0..255 are the 256 possible bytes.
   Any string at all can be encoded -- there is no "unknown token".
2. Merges. Training finds the most frequent adjacent pair of tokens, gives it
   a new id (256, 257, ...) and repeats. Frequent words end up as one token.
3. Special tokens. Ids after the merges, for markers such as <|endoftext|>.
   They are only produced when the caller explicitly allows them.

Before any of that, text is pre-split by a regular expression into chunks
(words with their leading space, numbers of at most 3 digits, punctuation
runs, whitespace), and merges never cross a chunk boundary.

The file reads top to bottom: the textbook trainer (count pairs, merge the most
frequent, repeat), the same algorithm made fast (train_bpe, what the scripts use),
the Tokenizer that encodes and decodes with the learned merges, and last the
tokenizer file: saving, loading and checking it.

Usage:
    from step1_tokenizer.bpe import train_bpe, Tokenizer
    tok = train_bpe(["aaabdaaabac"], vocab_size=256 + 3 + 4)
    tok.encode("aaabdaaabac")            # [258, 100, 258, 97, 99]
    tok.decode([258, 100])               # 'aaabd'
    tok.save("out/tiny.json"); Tokenizer.load("out/tiny.json")
"""

import hashlib
import heapq
import json
import pathlib
import sys
import unicodedata
from collections import Counter

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import regex  # the `regex` module: unlike `re`, it knows \p{L} (any letter) and possessive ++

from common.cli import UserError, next_command
from common import paths

# The pre-split pattern of GPT-4's tokenizer (cl100k). Alternatives, in order:
#   's 't 're 've 'm 'll 'd          English contractions, kept apart from the word
#   [^\r\n\p{L}\p{N}]?+\p{L}+       a word, with at most one leading space/symbol
#   \p{N}{1,3}                      numbers in groups of at most 3 digits
#    ?[^\s\p{L}\p{N}]++[\r\n]*      a run of punctuation, optional leading space
#   \s*[\r\n] | \s+(?!\S) | \s+     newlines and other whitespace
# `\s+(?!\S)` leaves the last space of a run to start the next word, so
# "   hello" splits as "  " + " hello" and " hello" stays one familiar chunk.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"  # separates documents in pretraining
IM_START = "<|im_start|>"  # starts a chat turn (step 4)
IM_END = "<|im_end|>"  # ends a chat turn (step 4)
IMAGE = "<image>"  # where an image goes in a conversation (step 6)
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, IMAGE)

FILE_FORMAT = "lm-tutorial-bpe-tokenizer"
FILE_VERSION = 1
TRAIN_COMMAND = "python step1_tokenizer/train_tokenizer.py"


# ----------------------------------------------------------------------------
# Training, the textbook way: count pairs, merge the most frequent, repeat


def merge_pair(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids`, left to right, by `new_id`.

    merge_pair([97, 97, 97, 98], (97, 97), 256) -> [256, 97, 98]
    (left to right, so "aaa" becomes "aa" + "a", never overlapping).
    """
    first, second = pair
    out = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == first and i + 1 < n and ids[i + 1] == second:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def count_pairs(ids):
    """How often each adjacent pair occurs in one list of ids."""
    return Counter(zip(ids, ids[1:]))


def train_bpe_textbook(documents, vocab_size, special_tokens=DEFAULT_SPECIAL_TOKENS, pattern=GPT4_SPLIT_PATTERN):
    """BPE training as the textbook states it: count every adjacent pair in the
    whole text, merge the most frequent everywhere, repeat. Ties go to the
    smallest pair (a, b), so the result never depends on dictionary order.
    Every merge recounts the whole text: slow on a real corpus (train_bpe
    below learns exactly the same merges with far less work)."""
    documents = [documents] if isinstance(documents, str) else documents
    num_merges = _number_of_merges(vocab_size, len(special_tokens))
    split = regex.compile(pattern)
    chunks = [list(chunk.encode("utf-8")) for doc in documents for chunk in split.findall(doc)]
    merges = []
    while len(merges) < num_merges:
        counts = Counter()
        for ids in chunks:
            counts.update(zip(ids, ids[1:]))  # every adjacent pair of every chunk
        if not counts:
            break  # every chunk is a single token: nothing left to merge
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # most frequent, then smallest
        new_id = 256 + len(merges)
        merges.append(best)
        chunks = [merge_pair(ids, best, new_id) for ids in chunks]
    return Tokenizer(merges, special_tokens, pattern)


def _number_of_merges(vocab_size, n_special):
    """How many merges make a vocabulary of vocab_size: 256 bytes + merges + special tokens."""
    num_merges = vocab_size - 256 - n_special
    if num_merges < 1:
        raise UserError(
            f"vocab_size {vocab_size} is too small: it must be more than 256 byte tokens "
            f"+ {n_special} special tokens = {256 + n_special}"
        )
    return num_merges


# ----------------------------------------------------------------------------
# The same, fast: incremental training


def train_bpe(
    documents,
    vocab_size,
    special_tokens=DEFAULT_SPECIAL_TOKENS,
    pattern=GPT4_SPLIT_PATTERN,
    progress=False,
):
    """Learn merges from `documents` (a list of strings, or one string) until
    the vocabulary has `vocab_size` ids: 256 bytes + merges + special tokens.

    The same merges as train_bpe_textbook, which recounts every pair in the
    whole text after each merge: (text length x number of merges). Instead:
      1. Pre-split every document and count UNIQUE chunks: " the" may occur
         100,000 times but is stored once, with weight 100,000.
      2. Count pairs once over the unique chunks (weighted), and keep an index
         pair -> ids of the chunks that contain it.
      3. After merging a pair, revisit only the chunks in its index entry and
         adjust only the counts of the pairs in those chunks.
      4. Find the most frequent pair with a heap. A count that changes is
         pushed again; stale entries are skipped when popped ("lazy deletion").
    Ties go to the smallest pair (a, b), so the result is deterministic.
    If the text runs out of pairs first, the vocabulary ends up smaller.
    """
    if isinstance(documents, str):
        documents = [documents]
    special_tokens = tuple(special_tokens)
    num_merges = _number_of_merges(vocab_size, len(special_tokens))

    # 1. unique chunks and how often each occurs
    split = regex.compile(pattern)
    chunk_counts = Counter()
    for doc in documents:
        chunk_counts.update(split.findall(doc))
    if not chunk_counts:
        raise UserError("the training text is empty: give the tokenizer some text to learn from")
    chunks = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # chunk id -> token ids
    weights = list(chunk_counts.values())  # chunk id -> how often it occurs

    # 2. pair counts (weighted) and the index pair -> chunk ids
    pair_counts = Counter()
    chunks_with_pair = {}
    for chunk_id, ids in enumerate(chunks):
        for pair, n in count_pairs(ids).items():
            pair_counts[pair] += n * weights[chunk_id]
            chunks_with_pair.setdefault(pair, set()).add(chunk_id)

    # 4. max-heap via negated counts; (-count, pair) tuples break ties by pair
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    bar = _progress_bar(num_merges, progress)
    while len(merges) < num_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_count:
            continue  # stale entry: this pair's count changed after it was pushed
        new_id = 256 + len(merges)
        merges.append(pair)
        bar.update(1)

        # 3. only chunks that contain the pair change
        changed = Counter()
        for chunk_id in chunks_with_pair.pop(pair):
            old_ids = chunks[chunk_id]
            new_ids = merge_pair(old_ids, pair, new_id)
            chunks[chunk_id] = new_ids
            old_pairs, new_pairs = count_pairs(old_ids), count_pairs(new_ids)
            weight = weights[chunk_id]
            for p, n in old_pairs.items():
                changed[p] -= n * weight
                if p not in new_pairs and p != pair:
                    chunks_with_pair[p].discard(chunk_id)
            for p, n in new_pairs.items():
                changed[p] += n * weight
                chunks_with_pair.setdefault(p, set()).add(chunk_id)
        for p, delta in changed.items():
            if delta == 0:
                continue
            count = pair_counts[p] + delta
            if count > 0:
                pair_counts[p] = count
                heapq.heappush(heap, (-count, p))
            else:  # the pair is gone (always so for the pair just merged)
                del pair_counts[p]
                chunks_with_pair.pop(p, None)
    bar.close()
    return Tokenizer(merges, special_tokens, pattern)


def _progress_bar(total, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc="learning merges", unit="merge", disable=not enabled)


# ----------------------------------------------------------------------------
# The tokenizer: encoding and decoding with the learned merges


def render_token(token_bytes):
    """Show a token's bytes readably: UTF-8 text where it is valid, \\xNN for
    bytes that are only part of a character, \\uNNNN for control characters."""
    text = token_bytes.decode("utf-8", errors="backslashreplace")
    return "".join(
        f"\\u{ord(ch):04x}" if unicodedata.category(ch).startswith("C") else ch for ch in text
    )


class Tokenizer:
    """Encodes text to token ids and decodes them back.

    Ids 0..255 are bytes, 256..255+len(merges) are merges (in the order they
    were learned), then one id for each special token.
    """

    def __init__(self, merges, special_tokens=DEFAULT_SPECIAL_TOKENS, pattern=GPT4_SPLIT_PATTERN):
        self.merges = [tuple(pair) for pair in merges]
        self.pattern = pattern
        self._split = regex.compile(pattern)
        # rank of a merge = when it was learned; encoding applies low ranks first,
        # exactly the order training created them.
        self._merge_rank = {pair: rank for rank, pair in enumerate(self.merges)}
        # id -> bytes, built up merge by merge
        self._id_to_bytes = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self._id_to_bytes.append(self._id_to_bytes[a] + self._id_to_bytes[b])
        first_special = 256 + len(self.merges)
        self.special_tokens = {name: first_special + i for i, name in enumerate(special_tokens)}
        self._special_id_to_name = {i: name for name, i in self.special_tokens.items()}
        self._special_split = {}  # frozenset of allowed names -> compiled regex
        self._cache = {}  # chunk text -> list of ids (text repeats a lot)

    # -- sizes and named ids --------------------------------------------------

    @property
    def vocab_size(self):
        return 256 + len(self.merges) + len(self.special_tokens)

    @property
    def eot_id(self):
        return self.special_tokens[ENDOFTEXT]

    @property
    def im_start_id(self):
        return self.special_tokens[IM_START]

    @property
    def im_end_id(self):
        return self.special_tokens[IM_END]

    @property
    def image_id(self):
        return self.special_tokens[IMAGE]

    def token_bytes(self, token_id):
        """The bytes one id stands for (a special token: its name, UTF-8 encoded)."""
        token_id = int(token_id)
        if 0 <= token_id < len(self._id_to_bytes):
            return self._id_to_bytes[token_id]
        if token_id in self._special_id_to_name:
            return self._special_id_to_name[token_id].encode("utf-8")
        raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")

    # -- encoding -------------------------------------------------------------

    def _encode_chunk(self, chunk):
        """Bytes of one pre-split chunk, then merges applied lowest rank first."""
        ids = list(chunk.encode("utf-8"))
        rank = self._merge_rank.get
        never = len(self.merges)  # the rank of a pair that was never learned: after all others
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: rank(p, never))  # learned earliest
            if rank(pair, never) == never:
                break  # no pair left that training merged
            ids = merge_pair(ids, pair, 256 + rank(pair))
        return ids

    def encode_ordinary(self, text):
        """Encode text, treating special-token text like any other text."""
        ids = []
        cache = self._cache
        if len(cache) > 500_000:  # keep memory bounded on huge, varied inputs
            cache.clear()
        for chunk in self._split.findall(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = cache[chunk] = self._encode_chunk(chunk)
            ids.extend(chunk_ids)
        return ids

    def _allowed_names(self, allowed_special):
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if allowed_special in ("none", None):
            return frozenset()
        if isinstance(allowed_special, str):
            allowed_special = {allowed_special}
        names = frozenset(allowed_special)
        unknown = names - set(self.special_tokens)
        if unknown:
            raise ValueError(
                f"unknown special token(s) {sorted(unknown)}; this tokenizer has {list(self.special_tokens)}"
            )
        return names

    def encode(self, text, allowed_special="none"):
        """Text -> list of token ids.

        allowed_special: "none" (default), "all", or a set of special-token
        names. Only allowed special tokens become their single id; any other
        "<|endoftext|>" in the text is encoded as ordinary bytes. This is a
        safety rule: text from a user or a web page must not be able to fake
        the end of a document or a chat turn.
        """
        names = self._allowed_names(allowed_special)
        if not names:
            return self.encode_ordinary(text)
        splitter = self._special_split.get(names)
        if splitter is None:
            # longest first, so a name that is a prefix of another cannot win;
            # the capturing group makes split() keep the special tokens.
            alternatives = "|".join(regex.escape(n) for n in sorted(names, key=len, reverse=True))
            splitter = self._special_split[names] = regex.compile(f"({alternatives})")
        ids = []
        for i, part in enumerate(splitter.split(text)):
            if i % 2 == 1:  # odd parts are the captured special tokens
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    # -- decoding -------------------------------------------------------------

    def decode(self, ids):
        """Token ids -> text. A byte sequence that is not valid UTF-8 (a
        character cut in half, e.g. by a model's sampling) becomes U+FFFD."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    # -- saving and loading ---------------------------------------------------

    def to_dict(self):
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "pattern": self.pattern,
            "merges": [list(pair) for pair in self.merges],
            "special_tokens": dict(self.special_tokens),
            # For people only (loading ignores it): what every id stands for.
            "vocab": {
                str(i): render_token(self.token_bytes(i)) for i in range(self.vocab_size)
            },
        }

    def save(self, path):
        """Write the tokenizer as readable JSON (written whole, then renamed)."""
        from common.checkpoint import atomic_write_text

        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, path):
        """Read a file written by save(); anything else is a UserError (see read_tokenizer_file)."""
        return read_tokenizer_file(path)


# ----------------------------------------------------------------------------
# The tokenizer file: reading it back, and refusing anything that is not one


def read_tokenizer_file(path):
    """The Tokenizer a file written by Tokenizer.save holds; anything else is a UserError naming
    the file, what is wrong with it, and the command that writes a good one."""
    path = pathlib.Path(path)
    fix = f"run {next_command(TRAIN_COMMAND)}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: tokenizer file not found; {fix}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror
        raise UserError(f"{path} is not a tokenizer file ({reason}); {fix}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path} is not a tokenizer file (invalid JSON at line {e.lineno}: {e.msg}; "
            f"truncated?); {fix}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UserError(
            f"{path} is not a tokenizer file (format {found!r}, expected {FILE_FORMAT!r}); {fix}"
        )
    if data.get("version") != FILE_VERSION:
        raise UserError(
            f"{path} has tokenizer format version {data.get('version')!r}, this code reads "
            f"version {FILE_VERSION}; {fix}"
        )
    problem = _check_contents(data)
    if problem:
        raise UserError(f"{path} is not a valid tokenizer file ({problem}); {fix}")
    specials = sorted(data["special_tokens"], key=data["special_tokens"].get)
    return Tokenizer(data["merges"], specials, data["pattern"])


def _check_contents(data):
    """Return what is wrong with a loaded tokenizer dict, or None."""
    merges, specials, pattern = data.get("merges"), data.get("special_tokens"), data.get("pattern")
    if not isinstance(pattern, str):
        return "no 'pattern' string"
    try:
        regex.compile(pattern)
    except regex.error as e:
        return f"the pattern does not compile: {e}"
    if not isinstance(merges, list):
        return "no 'merges' list"
    for rank, pair in enumerate(merges):
        ok = isinstance(pair, list) and len(pair) == 2 and all(type(x) is int for x in pair)
        if not ok or not all(0 <= x < 256 + rank for x in pair):
            return f"merge {rank} is {pair!r}, expected two ids of earlier tokens"
    if not isinstance(specials, dict):
        return "no 'special_tokens' object"
    first = 256 + len(merges)
    if sorted(specials.values()) != list(range(first, first + len(specials))):
        return f"special token ids must be {first}, {first + 1}, ... right after the merges"
    return None


def default_tokenizer_path() -> pathlib.Path:
    """out/tokenizer.json (out/quick/tokenizer.json in a --quick run): the tokenizer every later step uses."""
    return paths.OUT_DIR / "tokenizer.json"


def load_tokenizer(path=None):
    """Load the tokenizer every later step uses (default: default_tokenizer_path())."""
    return Tokenizer.load(default_tokenizer_path() if path is None else path)


def tokenizer_fingerprint(path) -> str:
    """A short hash of the tokenizer file: token files and checkpoints remember which tokenizer made them."""
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]


def load_tokenizer_with_fingerprint(path=None):
    """(tokenizer, fingerprint) of the tokenizer file at `path` (default out/tokenizer.json): a script that
    loads a model passes the fingerprint to load_model, which refuses a model trained with another."""
    path = pathlib.Path(path or default_tokenizer_path())
    return load_tokenizer(path), tokenizer_fingerprint(path)


if __name__ == "__main__":  # a module with a demo; train_tokenizer.py trains the real tokenizer
    import argparse

    demo = argparse.ArgumentParser(description=(
        "A module (step1_tokenizer/train_tokenizer.py and every later step use it). Run as a file, it shows "
        "BPE on one tiny string: the merges the textbook trainer and the fast one learn, and the ids it encodes to."))
    demo.parse_args()
    size = 256 + 3 + len(DEFAULT_SPECIAL_TOKENS)
    print("textbook merges:", train_bpe_textbook(["aaabdaaabac"], vocab_size=size).merges)
    tok = train_bpe(["aaabdaaabac"], vocab_size=size)
    print("fast merges:    ", tok.merges)
    print("ids:", tok.encode("aaabdaaabac"))
