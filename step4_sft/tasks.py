"""The four kinds of conversation step 4 teaches, generated from a seed, and how each is scored.

    facts         a question about the fictional world  ("Where does Wendel live?" -> "Wendel lives in Caldford.")
                  The knowledge comes from pretraining; SFT only teaches the question-and-answer format.
                  Train and evaluation questions are about DIFFERENT facts (world.split_facts; step 3's
                  quiz pages ask only about the training side), so a right answer on the evaluation
                  set can only come from the facts as step 3's stories and entries state them.
    instructions  rewrite (replace a word), list (make a numbered list), count, compare (who has more)
    multi_turn    the user says their name or a number, chats about something else, and asks for it back
    math          a grade-school word problem on small numbers, solved step by step in a fixed format,
                  ending in a GSM8K-style line "#### <number>"

Every answer is produced by a fixed rule, so a reply can be scored by exact match.

    train, evaluation = make_datasets(seed=0)
    score("math", "7 + 5 = 12.\\n#### 12", "...\\n#### 12")   # -> True: only the final number counts
"""

if __name__ == "__main__":  # run as a file: say what this is, before the imports below fail
    raise SystemExit("step4_sft/tasks.py is a module, not a script: "
                     "step4_sft/data.py --create_sample and step4_sft/eval_sft.py use it")

import json
import random
import re
import zlib

from common.world.skills import ITEMS, MAX_NUMBER, WORDS, new_name, sum_story
from common.world.world import ask, build_world, split_facts

TASKS = ("facts", "instructions", "multi_turn", "math")
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly assistant. Answer briefly."]
SYSTEM_CHANCE = 0.3  # this share of conversations starts with a system prompt
# Train sizes per task (default, quick) and evaluation sizes per task.
TRAIN_SIZES = {"default": {"facts": 3000, "instructions": 4000, "multi_turn": 3000, "math": 4000},
               "quick": {"facts": 150, "instructions": 150, "multi_turn": 150, "math": 150}}
EVAL_SIZES = {"default": 100, "quick": 8}
MADE_UP_NAME_SHARE = 0.5  # in TRAINING, this share of users and compared people get a made-up name (see name_picker)
# The words, items and number ranges come from the pretraining corpus's skill documents
# (common/world/skills.py): the model met copying, counting and sums there, and SFT teaches the format.


def held_out_name(name: str) -> bool:
    """One name in five is only ever a user's name in the evaluation set (a fixed rule, not a random draw)."""
    return zlib.crc32(name.encode()) % 5 == 0


def name_picker(names: list[str], made_up_share: float = 0.0, taken=()):
    """A function rng -> a name: one of `names`, or with chance `made_up_share` a made-up one ("Bazomi")
    that is none of `taken` (skills.new_name).

    Why made-up names in training: fine-tuned on conversations where users are called by the same
    thirty names, our model learnt to answer "Your name is" with one of THOSE names: asked by a user
    whose name it had never been told in training, it said a familiar name instead. With names
    that never repeat, the only way to get the answer right is to copy it from earlier in the chat.
    """
    def pick(rng) -> str:
        return new_name(rng, avoid=taken) if rng.random() < made_up_share else rng.choice(names)
    return pick


def _with_system(rng, messages: list[dict]) -> list[dict]:
    if rng.random() < SYSTEM_CHANCE:
        return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + messages
    return messages


def _chat(rng, task: str, kind: str, *turns: str) -> dict:
    """A record {"task", "kind", "conversations"} from alternating user / assistant texts."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"task": task, "kind": kind, "conversations": _with_system(rng, messages)}


# ----------------------------------------------------------------------------- (a) facts

def fact_conversation(fact, rng) -> dict:
    question, answer = ask(fact, rng)
    return _chat(rng, "facts", fact.relation, question, answer)


# ----------------------------------------------------------------------------- (b) instructions

def _word_list(rng, low=2, high=5) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def rewrite_turn(rng, pick_name) -> tuple[str, str]:
    words = _word_list(rng, 3, 5)
    old, new = rng.choice(words), rng.choice([w for w in WORDS if w not in words])
    replaced = [new if w == old else w for w in words]

    def sentence(ws):
        return f"I like {', '.join(ws[:-1])} and {ws[-1]}."
    return f'Rewrite this sentence, replacing "{old}" with "{new}": {sentence(words)}', sentence(replaced)


def list_turn(rng, pick_name) -> tuple[str, str]:
    words = _word_list(rng)
    return (f"Make a numbered list of these items: {', '.join(words)}.",
            "\n".join(f"{i}. {w}" for i, w in enumerate(words, 1)))


def count_turn(rng, pick_name) -> tuple[str, str]:
    words = _word_list(rng, 2, 7)
    return f"How many items are in this list: {', '.join(words)}?", f"There are {len(words)} items."


def compare_turn(rng, pick_name) -> tuple[str, str]:
    a = pick_name(rng)
    while (b := pick_name(rng)) == a:
        pass
    (n, m), item = rng.sample(range(2, MAX_NUMBER + 1), 2), rng.choice(ITEMS)  # no "1 apples"
    question = f"{a} has {n} {item} and {b} has {m} {item}. Who has {'more' if rng.random() < 0.5 else 'fewer'}?"
    more = question.endswith("more?")
    return question, f"{a if (n > m) == more else b} has {'more' if more else 'fewer'} {item}."


INSTRUCTIONS = {"rewrite": rewrite_turn, "list": list_turn, "count": count_turn, "compare": compare_turn}


def instruction_conversation(rng, pick_name) -> dict:
    kind = rng.choice(list(INSTRUCTIONS))
    return _chat(rng, "instructions", kind, *INSTRUCTIONS[kind](rng, pick_name))


# ----------------------------------------------------------------------------- (c) multi-turn recall

def multi_turn_conversation(rng, pick_user, filler_facts, pick_name) -> dict:
    """Say a name (and maybe a number), talk about something else, then ask for one of them back."""
    name, number = pick_user(rng), rng.randint(1, MAX_NUMBER)
    if rng.random() < 0.5:
        opening = (rng.choice([f"Hi, my name is {name}.", f"Hello! I am {name}.", f"Call me {name}, please."]),
                   f"Nice to meet you, {name}!")
    else:
        opening = (f"Hi, I am {name} and my favorite number is {number}.",
                   f"Nice to meet you, {name}! I will remember your favorite number.")
    turns = list(opening)
    if rng.random() < 0.5:
        turns += ask(rng.choice(filler_facts), rng)
    else:
        turns += rng.choice(list(INSTRUCTIONS.values()))(rng, pick_name)
    if "favorite number" in opening[0] and rng.random() < 0.5:
        kind = "number"
        turns += [rng.choice(["What is my favorite number?", "Do you remember my favorite number?"]),
                  f"Your favorite number is {number}."]
    else:
        kind = "name"
        turns += [rng.choice(["What is my name?", "Do you remember my name?"]), f"Your name is {name}."]
    return _chat(rng, "multi_turn", kind, *turns)


# ----------------------------------------------------------------------------- (d) math word problems

ADD = ["buys {n} more", "finds {n} more", "gets {n} more from a friend"]
SUBTRACT = ["gives {n} away", "loses {n}", "sells {n}"]


def math_conversation(rng, names) -> dict:
    """'Wendel has 7 apples. Then Wendel buys 5 more. ...' solved one operation per line:
    '7 + 5 = 12', ..., then '#### 12'."""
    name = rng.choice(names)
    item, story, steps, total = sum_story(rng, name, ADD, SUBTRACT)
    question = " ".join([story[0]] + [f"{sentence}." for sentence in story[1:]]
                        + [f"How many {item} does {name} have now?"])
    kind = f"{len(steps)} step" + ("s" if len(steps) > 1 else "")
    return _chat(rng, "math", kind, question, "\n".join(steps + [f"#### {total}"]))


# ----------------------------------------------------------------------------- the two sets

def _key(record: dict) -> str:
    """What makes two conversations 'the same item': the user and assistant turns (not the system prompt)."""
    return json.dumps([m for m in record["conversations"] if m["role"] != "system"])


def world_people(world) -> list[str]:
    """The world's people, whom conversations name (each name is one token of the tokenizer)."""
    return sorted({f.entity for f in world.facts if f.relation == "profession"})


def make_datasets(seed: int = 0, quick: bool = False, world_seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, evaluation) records. No evaluation conversation occurs in the training set; the
    facts are split by fact (world.split_facts, the split step 3's quiz pages keep to), and the
    users' names in multi-turn recall by name (held_out_name).
    world_seed: the world step 3 pretrained on (common.world.corpus.default_documents uses seed 0)."""
    profile = "quick" if quick else "default"
    rng = random.Random(seed)
    world = build_world(world_seed)
    train_facts, eval_facts = split_facts(world)  # the exam facts were never asked in step 3's quiz pages
    people = world_people(world)
    world_names = world.names()
    # Training mixes made-up names in (name_picker says why); evaluation uses only the world's people,
    # and its users only the held-out names.
    names = {False: name_picker(people, MADE_UP_NAME_SHARE, world_names), True: name_picker(people)}
    users = {held_out: name_picker([p for p in people if held_out_name(p) == held_out],
                                   0.0 if held_out else MADE_UP_NAME_SHARE, world_names) for held_out in (False, True)}

    makers = {"facts": lambda r, held_out: fact_conversation(r.choice(train_facts), r),
              "instructions": lambda r, held_out: instruction_conversation(r, names[held_out]),
              "multi_turn": lambda r, held_out: multi_turn_conversation(r, users[held_out], train_facts,
                                                                        names[held_out]),
              "math": lambda r, held_out: math_conversation(r, people)}
    train = [makers[task](rng, False) for task, n in TRAIN_SIZES[profile].items() for _ in range(n)]
    rng.shuffle(train)

    seen, evaluation = {_key(r) for r in train}, []
    n_eval = EVAL_SIZES[profile]
    evaluation += [fact_conversation(f, rng) for f in eval_facts[:n_eval]]
    for task in ("instructions", "multi_turn", "math"):
        made = 0
        while made < n_eval:
            record = makers[task](rng, True)
            if _key(record) not in seen:  # a repeat of a training item would test memory, not skill
                seen.add(_key(record))
                evaluation.append(record)
                made += 1
    return train, evaluation


# ----------------------------------------------------------------------------- scoring

def normalize(text: str) -> str:
    """Compare answers up to case, spacing and a final full stop."""
    return " ".join(text.lower().split()).rstrip(".")


# After "####": a sign, digits (in groups of three after commas, "1,234", or plain), a decimal part.
FINAL_NUMBER = re.compile(r"####\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")


def final_number(text: str) -> float | None:
    """The number on the '#### <number>' line (GSM8K's convention) as a number, or None:
    "#### 1,234" -> 1234.0, "#### -3" -> -3.0, "#### 2.50" -> 2.5."""
    match = FINAL_NUMBER.search(text)
    return float(match.group(1).replace(",", "")) if match else None


def score(task: str, reply: str, expected: str) -> bool:
    """Exact match: the whole reply (normalized), or for math only the final number, compared as a number."""
    if task == "math":
        return final_number(reply) is not None and final_number(reply) == final_number(expected)
    return normalize(reply) == normalize(expected)
