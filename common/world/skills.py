"""Everyday documents that exercise skills rather than facts: remembering what someone said earlier
in the text, reading a list back, swapping one word of a list, counting, comparing, small sums,
and pages of practice sums.

Why they are in the pretraining corpus: step 4's chat tasks ask the model to hand back a name the
user gave ten lines earlier, to copy a list, to add 7 and 5. Fine-tuning for a few minutes teaches a
model the FORMAT of an answer, not a new skill (what fine-tuning gave without these documents:
step3_pretrain/EXPERIMENTS.md, "Why the skill text is there"). Real pretraining corpora are full of
such text (school worksheets included); ours gets it from these templates.

None of these documents states a fact about the world: people and towns appear only as names
(a host meets a traveler in the host's own town, so nothing contradicts the world either), and
the world's facts stay exactly as world.py tells them. Names, numbers and words are drawn at random,
so a document can only be predicted by looking back at what it said before.

    docs = skill_documents(build_world(0), target_bytes=1_000_000, seed=0)
"""

if __name__ == "__main__":  # run as a file: say what this is, before the imports below fail
    raise SystemExit("common/world/skills.py is a module, not a script: "
                     "common/world/world.py and step3_pretrain/data.py use it")

import random

from common.world.world import FOODS, SPECIES, World

ITEMS = ["apples", "berries", "mushrooms", "coins", "beetles", "seeds"]   # things people count
# Things people list: words the world text spells often, so each is one token (step 4 reuses these).
WORDS = sorted(set(FOODS + SPECIES + ITEMS) - {"acorns", "carrots", "pony"})
MAX_NUMBER = 9    # a number someone says, or adds or takes away: one digit
MAX_TOTAL = 20    # every running total stays at or below this
NEW_NAME_SHARE = 0.3  # this share of strangers get a made-up name instead of a world person's name
CONSONANTS, VOWELS = "bdfghklmnprstvz", "aeiou"


def new_name(rng, avoid=()) -> str:
    """A made-up name of two or three syllables ("Bazomi"): several tokens to copy, not one.
    It never equals, contains or hides inside a name in `avoid` (the world's names), so a made-up
    stranger is never mistaken for someone the world's text talks about."""
    avoid = [a.lower() for a in avoid]
    while True:
        name = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3))).capitalize()
        if not any(name.lower() in a or a in name.lower() for a in avoid):
            return name


def sum_story(rng, person: str, add_verbs, take_verbs) -> tuple[str, list[str], list[str], int]:
    """One to three steps of adding and taking away, every total between 1 and MAX_TOTAL:
    (item, sentences "Mira has 7 apples." "Then Mira buys 5 more", sums "7 + 5 = 12", final total).
    Step 4's math problems are written from the same function, so pretraining has seen each kind of sum."""
    item, total = rng.choice(ITEMS), rng.randint(2, MAX_NUMBER)
    story, working = [f"{person} has {total} {item}."], []
    for _ in range(rng.randint(1, 3)):
        add, n = next_sum(rng, total)
        story.append(f"Then {person} {rng.choice(add_verbs if add else take_verbs).format(n=n)}")
        line, total = worked_sum(total, add, n)
        working.append(line)
    return item, story, working, total


def next_sum(rng, total: int) -> tuple[bool, int]:
    """(add?, n): one more step from `total` that keeps the running total between 1 and MAX_TOTAL."""
    add = total < 3 or (total + 1 <= MAX_TOTAL and rng.random() < 0.5)
    return add, rng.randint(1, min(MAX_NUMBER, MAX_TOTAL - total) if add else min(MAX_NUMBER, total - 1))


def worked_sum(total: int, add: bool, n: int) -> tuple[str, int]:
    """("7 + 5 = 12", 12): the line a worked answer writes, and the new total."""
    result = total + n if add else total - n
    return f"{total} {'+' if add else '-'} {n} = {result}", result


def _and_list(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


class _Writer:
    def __init__(self, world: World, rng: random.Random):
        self.world, self.people, self.rng = world, world.names("person"), rng

    def stranger(self, host: str) -> str:
        """Someone new to `host`: a world person other than the host, or a made-up name."""
        if self.rng.random() < NEW_NAME_SHARE:
            return new_name(self.rng, avoid=self.world.names())
        return self.rng.choice([p for p in self.people if p != host])

    def introduction(self) -> str:
        """Someone says a name (and a number); other talk follows; the name (or number) is said back."""
        r = self.rng
        host = r.choice(self.people)
        name, number = self.stranger(host), r.randint(1, MAX_NUMBER)
        town = self.world.fact(host, "lives_in")  # the host's own town: true to the world, though never said so
        opening = r.choice([f'"Hello, my name is {name}," said the traveler.', f'"I am {name}," said the traveler.',
                            f'"Call me {name}," said the traveler.'])
        with_number = r.random() < 0.5
        if with_number:
            opening += f' "My favorite number is {number}."'
        middle = " ".join(r.sample([f"{host} showed the traveler around {town}.", "They talked about the weather.",
                                    f"{host} made some tea and they sat by the fire.", "They walked to the market.",
                                    "The traveler was tired after the long road.", f"{host} told a story."],
                                   r.randint(1, 3)))
        if with_number and r.random() < 0.5:
            ending = (f'Later {host} asked, "What was your favorite number?" '
                      f'"My favorite number is {number}," said {name}.')
        else:
            ending = r.choice([f'Later {host} said, "Your name is {name}, I remember."',
                               f'When they met again, {host} said, "Good morning, {name}!"',
                               f'"What was your name again?" asked {host}. "My name is {name}," said the traveler.'])
        return f"A traveler came to {town} and met {host}. {opening} {middle} {ending}"

    def shopping_list(self) -> str:
        """A list, the same list numbered, and how many things are on it."""
        r = self.rng
        person, words = r.choice(self.people), r.sample(WORDS, r.randint(2, 6))
        numbered = "\n".join(f"{i}. {w}" for i, w in enumerate(words, 1))
        return (f"{person} wrote down what to buy: {', '.join(words)}. At home {person} made a numbered list:\n"
                f"{numbered}\nThere are {len(words)} items on the list.")

    def change_of_mind(self) -> str:
        """A sentence, then the same sentence with one word swapped for another."""
        r = self.rng
        person, words = r.choice(self.people), r.sample(WORDS, r.randint(3, 5))
        old, new = r.choice(words), r.choice([w for w in WORDS if w not in words])
        swapped = [new if w == old else w for w in words]
        return (f'{person} said, "I like {_and_list(words)}." Then {person} changed one word, {old} for {new}, '
                f'and said, "I like {_and_list(swapped)}."')

    def comparison(self) -> str:
        """Two people, two counts, who has more and who has fewer."""
        r = self.rng
        (a, b), (n, m), item = r.sample(self.people, 2), r.sample(range(2, MAX_NUMBER + 1), 2), r.choice(ITEMS)
        more, fewer = (a, b) if n > m else (b, a)
        return (f"{a} has {n} {item} and {b} has {m} {item}. {max(n, m)} is more than {min(n, m)}, "
                f"so {more} has more {item} and {fewer} has fewer {item}.")

    def sums(self) -> str:
        """A story of adding and taking away, each step a sum like step 4's math answers: written as the
        story goes, or (half the time) the story first and the working after, as a question is answered."""
        r = self.rng
        person = r.choice(self.people)
        item, story, working, total = sum_story(r, person, ["buys {n} more", "finds {n} more"],
                                                ["gives {n} away", "sells {n}"])
        if r.random() < 0.5:
            steps = " ".join(f"{s}: {w}." for s, w in zip(story[1:], working))
            return f"{story[0]} {steps} Now {person} has {total} {item}."
        steps = " ".join(s + "." for s in story[1:])
        lines = "\n".join(working)  # one sum per line, as a worked answer (and step 4's) is written
        return f"{story[0]} {steps} To count the {item}:\n{lines}\nNow {person} has {total} {item}."

    def worksheet(self) -> str:
        """A page of practice sums, one per line, each starting from the last answer.
        Why: the stories above hold each sum (7 + 5 = 12) only a few times per pass over the corpus,
        too rarely for our model to learn adding from them (step3_pretrain/EXPERIMENTS.md, "What did
        it learn? The probe on three corpora")."""
        r = self.rng
        total, lines = r.randint(1, MAX_TOTAL), []
        for _ in range(r.randint(8, 14)):
            line, total = worked_sum(total, *next_sum(r, total))
            lines.append(line)
        return f"{r.choice(self.people)} practised sums:\n" + "\n".join(lines)

    def echo(self) -> str:
        """A game of echo: a row of 4 to 10 words said, then said back. The words are drawn at random
        from the list words, the world's people, the digits and made-up names, so the row said back
        can only be predicted by copying it. Not in the default corpus: step 3's copying experiment."""
        r = self.rng
        leader = r.choice(self.people)
        pool = WORDS + self.people + [str(n) for n in range(1, MAX_NUMBER + 1)]
        row = ", ".join(new_name(r, avoid=self.world.names()) if r.random() < 0.1 else r.choice(pool)
                        for _ in range(r.randint(4, 10)))
        return f"{leader} played the echo game with the children. {leader} said: {row}. The children said back: {row}."


KINDS = ("introduction", "shopping_list", "change_of_mind", "comparison", "sums", "worksheet")


def skill_documents(world: World, target_bytes: int, seed: int = 0) -> list[str]:
    """About `target_bytes` of skill documents, the kinds taking turns; the same seed gives the same text."""
    writer, docs, total = _Writer(world, random.Random(seed)), [], 0
    while total < target_bytes:
        doc = getattr(writer, KINDS[len(docs) % len(KINDS)])()
        docs.append(doc)
        total += len(doc.encode("utf-8")) + 2  # + the blank line that separates documents in a file
    return docs


def echo_documents(world: World, n: int, seed: int = 0) -> list[str]:
    """n echo games and nothing else: a corpus where the end of every document is a copy
    (step3_pretrain/data.py --echo_games; step3_pretrain/EXPERIMENTS.md, "Can more text teach copying?")."""
    writer = _Writer(world, random.Random(seed))
    return [writer.echo() for _ in range(n)]
