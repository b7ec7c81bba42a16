"""A small made-up world, written out as text: the default corpus of this tutorial.

Why a made-up world? Every fact in it is known exactly, so later steps can ask a
model about it and score the answer; none of it is on the internet, so whatever
the model knows it learnt from our corpus; and it is kept small (74 entities,
about 300 facts) so that a model of a few million parameters can hope to learn
all of it by heart in minutes.

The world holds people, places (towns) and creatures. Each has 3-5 facts, stored
as data -- Fact(entity, relation, value) -- beside the text written about them:

    person:   lives_in (a place), profession, favorite_color, friend (a person), pet (a creature; some)
    place:    region, known_for, weather
    creature: species, lives_in (a place), color, food

The text: encyclopedia entries, town guides, letters and short stories with
dialogue, each fact said in several phrasings, so that every fact appears many
times in fluent, simple English; and quiz pages (`quiz_documents`) that ask
about most facts and answer in full sentences (the rest, `split_facts`, are
step 4's exam). Documents contain no blank line, so they can be
written one per blank-line block.

Usage:
    from common.world.world import build_world, generate_documents, ask, CORPUS_BYTES
    world = build_world(seed=0)                        # same seed, same world
    world.fact("Wendel", "lives_in")                   # -> 'Caldford'
    docs = generate_documents(world, target_bytes=CORPUS_BYTES["default"], seed=0)  # about 5 MB
    question, answer = ask(world.facts[0])             # ('Where does Wendel live?', 'Wendel lives in Caldford.')

Step 5 holds entities out of the text (they go only into a retrieval database,
see `documents_about`) and rewrites facts (`overrides`):
    docs = generate_documents(world, hold_out=["Wendel"], overrides={("Selabert", "lives_in"): "Willey"})
A held-out name never appears in the generated text. A fact about a visible
entity whose VALUE is a held-out entity (Arira's best friend is Wendel) is left
out of the text too: `visible_facts` lists the facts the text does state.
`add_newcomers(world, 12, 8)` returns the world plus people and creatures whose names occur in no
text of the corpus at all: step 5 stores them only in its database, without retraining steps 3 and 4.

Run `python common/world/world.py` to see a sample.
"""
import sys
import pathlib

if __package__ in (None, ""):  # run as a file: make the repo root importable from any folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import argparse
import random
import re
import time
from dataclasses import dataclass, field

from common.cli import UserError, run_main

# --------------------------------------------------------------------------- the world's vocabulary
# Small closed sets: a fact's value is one of a few words, so answers can be scored by exact match.
PROFESSIONS = {  # profession -> what such a person is seen doing in a story
    "baker": "baking bread", "blacksmith": "shaping a horseshoe", "sailor": "mending a sail",
    "healer": "mixing herbs", "weaver": "weaving a rug", "farmer": "plowing a field",
    "potter": "shaping a bowl", "scribe": "copying an old book", "miner": "cleaning a lamp",
    "hunter": "making arrows", "musician": "tuning a fiddle", "carpenter": "building a chair",
    "fisher": "mending a net", "teacher": "writing a lesson", "shepherd": "counting sheep",
    "cook": "stirring a pot of soup", "gardener": "planting beans", "merchant": "counting coins",
    "painter": "painting a sign", "builder": "laying bricks",
}
FAVORITE_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown"]
REGIONS = ["north", "south", "east", "west"]
KNOWN_FOR = ["cherry orchards", "stone bridge", "glass market", "lantern festival", "old library",
             "salt mines", "windmills", "hot springs", "bell tower", "river boats", "spring fair",
             "tall lighthouse", "rose gardens", "horse races", "painted houses", "copper domes",
             "great oak", "clock tower", "music hall", "night market"]
WEATHERS = ["rainy", "windy", "snowy", "sunny", "foggy", "stormy", "cloudy"]
SPECIES = ["fox", "owl", "dragon", "otter", "badger", "raven", "cat", "hare", "tortoise", "goat",
           "pony", "hedgehog"]
CREATURE_COLORS = ["red", "gray", "black", "white", "brown", "golden", "silver", "blue", "green", "orange"]
FOODS = ["berries", "fish", "acorns", "honey", "mushrooms", "beetles", "clover", "apples", "carrots", "seeds"]

# Names are built from syllables: pronounceable, clearly not English, and different per kind.
PERSON_SYLLABLES = (
    ["Tal", "Mir", "Bel", "Cor", "Dar", "El", "Fen", "Gar", "Hal", "Is", "Jor", "Kel", "Lor", "Mar",
     "Nel", "Or", "Per", "Quin", "Ros", "Sel", "Tam", "Ul", "Vin", "Wen", "Yor", "Zel", "Ar", "Bren"],
    ["", "", "", "en", "i", "a", "o", "an"],
    ["vor", "da", "wen", "dric", "lia", "mond", "ric", "na", "lo", "rin", "sa", "tha", "del", "wyn",
     "mir", "bert", "ra", "ven"])
FEMININE_ENDINGS = ("da", "wen", "lia", "na", "sa", "tha", "wyn", "ra")  # the rest read as male names
PLACE_SYLLABLES = (
    ["Bran", "Ash", "Stone", "Elder", "Thorn", "Glen", "Wolf", "Oak", "Kes", "Dun", "Fal", "Hollow",
     "Wil", "Marl", "Tarn", "Brom", "Cald", "Ever", "Lin", "Mos"],
    [""],
    ["nock", "mere", "ford", "wick", "holm", "dale", "bury", "stead", "brook", "haven", "moor", "gate",
     "ley", "combe"])
CREATURE_SYLLABLES = (
    ["Pip", "Bram", "Nib", "Tum", "Wisp", "Quil", "Rum", "Bix", "Mop", "Zib", "Tuff", "Cob", "Dob",
     "Gim", "Fizz", "Snor", "Tig", "Wob", "Pud", "Jax", "Lop", "Mun"],
    [""],
    ["ket", "sy", "let", "kin", "o", "wick", "by", "ling", "wen", "kit"])

KIND_RELATIONS = {  # the relations each kind of entity has, in the order they are listed
    "person": ("lives_in", "profession", "favorite_color", "friend", "pet"),
    "place": ("region", "known_for", "weather"),
    "creature": ("species", "lives_in", "color", "food"),
}
LINKS = {"lives_in": "place", "friend": "person", "pet": "creature"}  # relations whose value is an entity

WORLD_SIZES = {  # how many entities of each kind; "quick" is a smaller world for fast tests
    "default": {"place": 14, "person": 40, "creature": 20},
    "quick": {"place": 4, "person": 10, "creature": 6},
}
CORPUS_BYTES = {"default": 5_000_000, "quick": 200_000}  # text to generate for each profile
PET_CHANCE = 0.6  # a creature with a possible owner in its town becomes a pet this often
PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "him", "his"), "it": ("it", "it", "its")}


# --------------------------------------------------------------------------- facts and the world
@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    value: str


@dataclass
class World:
    """Entities (name -> kind) and their facts. Build one with build_world()."""
    seed: int
    size: str
    entities: dict[str, str]   # name -> "person" | "place" | "creature"
    facts: list[Fact]
    pronouns: dict[str, str]   # name -> "she" | "he" | "it": keeps stories consistent, not a fact
    _index: dict = field(init=False, repr=False)

    def __post_init__(self):
        self._index = {(f.entity, f.relation): f.value for f in self.facts}

    def fact(self, entity: str, relation: str) -> str:
        """The value of one fact, e.g. world.fact("Wendel", "lives_in") -> "Caldford"."""
        try:
            return self._index[entity, relation]
        except KeyError:
            raise KeyError(f"no fact ({entity!r}, {relation!r}) in this world") from None

    def get(self, entity: str, relation: str, default=None):
        return self._index.get((entity, relation), default)

    def facts_about(self, entity: str) -> list[Fact]:
        return [f for f in self.facts if f.entity == entity]

    def names(self, kind: str | None = None) -> list[str]:
        return [name for name, k in self.entities.items() if kind is None or k == kind]


def _make_names(rng, syllables, count, taken):
    """`count` new names from (start, middle, end) syllables. No name may contain another
    (so "Wen" can never be found inside "Wendel"), which keeps held-out names truly absent."""
    starts, middles, ends = syllables
    names = []
    for _ in range(10_000):
        if len(names) == count:
            return names
        start, end = rng.choice(starts), rng.choice(ends)
        name = start + rng.choice(middles) + end
        lower = name.lower()
        clash = any(lower in other.lower() or other.lower() in lower for other in taken)
        if start.lower() != end and not clash:
            names.append(name)
            taken.append(name)
    raise RuntimeError("ran out of syllable combinations; add syllables or shrink the world")


def build_world(seed: int = 0, size: str = "default") -> World:
    """A random but reproducible world: the same seed and size always give the same world."""
    if size not in WORLD_SIZES:
        raise UserError(f"unknown world size {size!r}; choose one of {', '.join(WORLD_SIZES)}")
    counts = WORLD_SIZES[size]
    rng = random.Random(seed)
    taken: list[str] = []
    places = _make_names(rng, PLACE_SYLLABLES, counts["place"], taken)
    people = _make_names(rng, PERSON_SYLLABLES, counts["person"], taken)
    creatures = _make_names(rng, CREATURE_SYLLABLES, counts["creature"], taken)
    values: dict[str, dict[str, str]] = {name: {} for name in people + places + creatures}

    known_for = rng.sample(KNOWN_FOR, len(places))  # each town famous for something different
    regions = [REGIONS[i % len(REGIONS)] for i in range(len(places))]  # as many towns in each region
    rng.shuffle(regions)
    for i, place in enumerate(places):
        values[place]["region"] = regions[i]
        values[place]["known_for"] = known_for[i]
        values[place]["weather"] = rng.choice(WEATHERS)

    homes = places + [rng.choice(places) for _ in people[len(places):]]  # every town has someone
    rng.shuffle(homes)
    for person, home in zip(people, homes):
        values[person]["lives_in"] = home
        values[person]["profession"] = rng.choice(list(PROFESSIONS))
        values[person]["favorite_color"] = rng.choice(FAVORITE_COLORS)
    # Best friends come in pairs, so "Who is X's best friend?" has one answer both ways round.
    order = rng.sample(people, len(people))
    for a, b in zip(order[0::2], order[1::2]):
        values[a]["friend"], values[b]["friend"] = b, a

    for creature in creatures:
        values[creature]["species"] = rng.choice(SPECIES)
        values[creature]["lives_in"] = rng.choice(places)
        values[creature]["color"] = rng.choice(CREATURE_COLORS)
        values[creature]["food"] = rng.choice(FOODS)
        # A pet lives in its owner's town; a person has at most one pet.
        owners = [p for p in people if values[p]["lives_in"] == values[creature]["lives_in"]
                  and "pet" not in values[p]]
        if owners and rng.random() < PET_CHANCE:
            values[rng.choice(owners)]["pet"] = creature

    entities = {**{p: "person" for p in people}, **{p: "place" for p in places},
                **{c: "creature" for c in creatures}}
    facts = [Fact(name, rel, values[name][rel])
             for name, kind in entities.items() for rel in KIND_RELATIONS[kind] if rel in values[name]]
    pronouns = {name: ("it" if kind != "person" else "she" if name.endswith(FEMININE_ENDINGS) else "he")
                for name, kind in entities.items()}
    return World(seed, size, entities, facts, pronouns)


def apply_overrides(world: World, overrides) -> World:
    """A copy of the world with some facts rewritten: {(entity, relation): new_value}."""
    if not overrides:
        return world
    for (entity, relation), value in overrides.items():
        if (entity, relation) not in world._index:
            known = ", ".join(f.relation for f in world.facts_about(entity)) or "none: unknown entity"
            raise UserError(f"override ({entity}, {relation}): no such fact to rewrite "
                            f"(relations of {entity}: {known})")
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"override ({entity}, {relation}): the new value must be a non-empty string")
        wanted = LINKS.get(relation)
        if wanted and world.entities.get(value) != wanted:
            raise UserError(f"override ({entity}, {relation}): {value!r} is not a {wanted} of this world")
    facts = [Fact(f.entity, f.relation, overrides.get((f.entity, f.relation), f.value)) for f in world.facts]
    return World(world.seed, world.size, dict(world.entities), facts, dict(world.pronouns))


NEWCOMERS = {"default": {"person": 12, "creature": 8}, "quick": {"person": 4, "creature": 2}}


def add_newcomers(world: World, n_people: int, n_creatures: int, seed: int = 1, avoid=()) -> World:
    """A new World: the same entities and facts, plus `n_people` people and `n_creatures` creatures that
    no training text ever names (step 5 stores them only in its retrieval database).

    Their names come from the same syllables, never contain or hide inside an existing name, and never
    have the consonant-vowel shape of skills.new_name's made-up strangers, so they occur in no text of
    the corpus or of step 4's conversations. Their facts are drawn from the same closed value sets;
    they live in existing towns, and their best friends and pets are other newcomers (best friends
    come in pairs: a newcomer befriending an existing person would rewrite that person's fact).
    The existing entities' facts are unchanged, so the corpus of `world` is unchanged too.
    avoid: more names a newcomer may not clash with (the quick world's newcomers avoid the default
    world's names, which step 4's conversations use in every profile)."""
    from common.world.skills import CONSONANTS, VOWELS  # (skills imports this module)

    made_up_shape = re.compile(f"(?:[{CONSONANTS}][{VOWELS}]){{2,3}}")
    rng = random.Random(f"newcomers {world.seed} {seed}")
    taken = list(world.entities) + list(avoid)

    def fresh(syllables, count):
        names = []
        while len(names) < count:
            name = _make_names(rng, syllables, 1, taken)[0]  # (reserved in `taken` even if refused)
            if not made_up_shape.fullmatch(name.lower()):
                names.append(name)
        return names

    people, creatures = fresh(PERSON_SYLLABLES, n_people), fresh(CREATURE_SYLLABLES, n_creatures)
    places = world.names("place")
    values = {name: {} for name in people + creatures}
    for person in people:
        values[person] = {"lives_in": rng.choice(places), "profession": rng.choice(list(PROFESSIONS)),
                          "favorite_color": rng.choice(FAVORITE_COLORS)}
    order = rng.sample(people, len(people))
    for a, b in zip(order[0::2], order[1::2]):
        values[a]["friend"], values[b]["friend"] = b, a
    for creature in creatures:
        values[creature] = {"species": rng.choice(SPECIES), "lives_in": rng.choice(places),
                            "color": rng.choice(CREATURE_COLORS), "food": rng.choice(FOODS)}
        owners = [p for p in people if values[p]["lives_in"] == values[creature]["lives_in"] and "pet" not in values[p]]
        if owners and rng.random() < PET_CHANCE:
            values[rng.choice(owners)]["pet"] = creature
    kinds = {**{p: "person" for p in people}, **{c: "creature" for c in creatures}}
    facts = [Fact(name, rel, values[name][rel]) for name, kind in kinds.items()
             for rel in KIND_RELATIONS[kind] if rel in values[name]]
    pronouns = {name: ("it" if kind != "person" else "she" if name.endswith(FEMININE_ENDINGS) else "he")
                for name, kind in kinds.items()}
    return World(world.seed, world.size, {**world.entities, **kinds}, world.facts + facts,
                 {**world.pronouns, **pronouns})


def _check_hold_out(world: World, hold_out) -> frozenset:
    if isinstance(hold_out, str):  # one name, not a list of letters
        hold_out = [hold_out]
    unknown = [name for name in hold_out if name not in world.entities]
    if unknown:
        raise UserError(f"hold_out: unknown entity {unknown[0]!r}; names come from build_world(...).entities")
    return frozenset(hold_out)


def visible_facts(world: World, hold_out=(), overrides=None) -> list[Fact]:
    """The facts that generate_documents(world, hold_out=..., overrides=...) states in its text:
    every fact whose entity and value are both not held out, with the overrides applied."""
    hidden = _check_hold_out(world, hold_out)
    return [f for f in apply_overrides(world, overrides).facts
            if f.entity not in hidden and f.value not in hidden]


# --------------------------------------------------------------------------- saying one fact
# "{e}" is the entity, "{v}" the value, "{a_v}" the value with "a"/"an", "{poss}" the entity's
# "his/her/its", "{v_species}" the species of a pet, "{e_species}" the species of a creature.
# The first phrasing of each relation is the plain one that documents_about() uses.
STATEMENTS = {
    "lives_in": ["{e} lives in {v}", "{e} makes {poss} home in {v}", "{e} has lived in {v} for years",
                 "The home of {e} is in {v}", "In {v} you can find the home of {e}"],
    "profession": ["{e} is {a_v}", "{e} works as {a_v}", "By trade, {e} is {a_v}",
                   "{e} earns {poss} living as {a_v}", "Everyone in town knows {e} as {a_v}"],
    "favorite_color": ["{e}'s favorite color is {v}", "The favorite color of {e} is {v}",
                       "{e} likes {v} better than any other color", "{e} loves the color {v}"],
    "friend": ["{e}'s best friend is {v}", "The best friend of {e} is {v}", "{e} and {v} are best friends",
               "{e} spends most days with {poss} best friend, {v}"],
    "pet": ["{e} has a pet {v_species} named {v}", "{e}'s pet is called {v}", "{v} is the pet of {e}",
            "{e} looks after a pet named {v}"],
    "region": ["{e} is a town in the {v}", "{e} lies in the {v} of the land", "You will find {e} in the {v}",
               "The town of {e} is in the {v}"],
    "known_for": ["{e} is known for its {v}", "{e} is famous for its {v}", "Travelers visit {e} for its {v}",
                  "The pride of {e} is its {v}"],
    "weather": ["The weather in {e} is usually {v}", "It is often {v} in {e}",
                "{e} has {v} weather most of the year", "Most days in {e} are {v}"],
    "species": ["{e} is {a_v}", "The creature named {e} is {a_v}", "Anyone can tell that {e} is {a_v}"],
    "color": ["{e} is {v} in color", "The color of {e} is {v}", "{e} is {a_v} {e_species}",
              "{e} is {v} from head to tail"],
    "food": ["{e} eats {v}", "{e} likes to eat {v}", "The favorite food of {e} is {v}",
             "{e} lives mostly on {v}", "Every day {e} looks for {v} to eat"],
}

# Questions for step 4's chat: a few ways to ask, and one answer that contains the value verbatim.
QUESTIONS = {
    "lives_in": (["Where does {e} live?", "In which town does {e} live?", "Where is the home of {e}?"],
                 "{e} lives in {v}."),
    "profession": (["What does {e} do for a living?", "What is {e}'s job?", "What work does {e} do?"],
                   "{e} is {a_v}."),
    "favorite_color": (["What is {e}'s favorite color?", "Which color does {e} like best?"],
                       "{e}'s favorite color is {v}."),
    "friend": (["Who is {e}'s best friend?", "Who is the best friend of {e}?"], "{e}'s best friend is {v}."),
    "pet": (["What is the name of {e}'s pet?", "What is {e}'s pet called?"], "{e}'s pet is called {v}."),
    "region": (["In which part of the land is {e}?", "Where is the town of {e}?"], "{e} is in the {v}."),
    "known_for": (["What is {e} known for?", "What is {e} famous for?"], "{e} is known for its {v}."),
    "weather": (["What is the weather like in {e}?", "How is the weather in {e}?"],
                "The weather in {e} is usually {v}."),
    "species": (["What kind of creature is {e}?", "What animal is {e}?"], "{e} is {a_v}."),
    "color": (["What color is {e}?", "What is the color of {e}?"], "{e} is {v} in color."),
    "food": (["What does {e} eat?", "What food does {e} like to eat?"], "{e} eats {v}."),
}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _fields(world: World, fact: Fact) -> dict:
    subject, _, possessive = PRONOUNS[world.pronouns.get(fact.entity, "it")]
    return {"e": fact.entity, "v": fact.value, "a_v": _a(fact.value), "poss": possessive,
            "Subj": subject.capitalize(), "Poss": possessive.capitalize(),
            "v_species": world.get(fact.value, "species", "creature"),
            "e_species": world.get(fact.entity, "species", "creature")}


def phrasings(world: World, fact: Fact) -> list[str]:
    """Every way the text may state `fact` with the entity's name (no final period); [0] is the plain one."""
    fields = _fields(world, fact)
    return [t.format(**fields) for t in STATEMENTS[fact.relation]]


def _state(world: World, fact: Fact, rng, pronoun: bool = False) -> str:
    """One sentence stating `fact` in a random phrasing; `pronoun` says "She" instead of the name."""
    template = rng.choice(STATEMENTS[fact.relation])
    if pronoun and template.startswith("{e}'s "):
        template = "{Poss} " + template[len("{e}'s "):]
    elif pronoun and template.startswith("{e} "):
        template = "{Subj} " + template[len("{e} "):]
    return template.format(**_fields(world, fact)) + "."


def ask(fact: Fact, rng: random.Random | None = None) -> tuple[str, str]:
    """A question about `fact` and its answer, e.g. ("Where does Wendel live?", "Wendel lives in Caldford.").
    The answer always contains fact.value verbatim, the short form for exact-match scoring.
    Without `rng` the first phrasing is used; with one, a random phrasing."""
    if fact.relation not in QUESTIONS:
        raise UserError(f"no questions for relation {fact.relation!r}; known: {', '.join(QUESTIONS)}")
    questions, answer = QUESTIONS[fact.relation]
    question = questions[0] if rng is None else rng.choice(questions)
    fields = {"e": fact.entity, "v": fact.value, "a_v": _a(fact.value)}
    return question.format(**fields), answer.format(**fields)


EXAM_SHARE = 0.2  # this share of the facts is kept out of the quiz pages: step 4 asks about them only in its exam


def split_facts(world: World) -> tuple[list[Fact], list[Fact]]:
    """(quiz facts, exam facts), a fixed split of the world's facts.

    The corpus's quiz pages (quiz_documents) ask about the quiz facts only, and step 4's held-out
    evaluation asks about the exam facts only, so no evaluation question is ever seen with its
    answer before: a right answer must come from the facts as the ordinary text states them.
    (Step 4 asks about the default world; a --quick corpus's quiz pages split the quick world on
    their own, so that promise holds for the default corpus.)
    Best friends come in pairs (A's friend is B, B's friend is A): one pair is one piece of
    knowledge, so both of its facts go to the same side."""
    groups = {}
    for f in world.facts:
        key = frozenset((f.entity, f.value)) if f.relation == "friend" else (f.entity, f.relation)
        groups.setdefault(key, []).append(f)
    groups = list(groups.values())
    random.Random(world.seed).shuffle(groups)
    n_exam = max(1, round(len(groups) * EXAM_SHARE))
    return [f for g in groups[n_exam:] for f in g], [f for g in groups[:n_exam] for f in g]


# --------------------------------------------------------------------------- documents
FILLERS = {  # sentences that state no fact: they make the text read like prose, not a table
    "person": ["{e} is well liked by {poss} neighbors.", "People say that {e} always has time for a chat.",
               "{Subj} likes to take long walks in the evening.",
               "Little is written about the early years of {e}.",
               "{e} tells good stories on winter nights.", "{Subj} keeps a small garden behind the house.",
               "On market days {e} is up before the sun."],
    "place": ["The streets of {e} are busy on market days.", "A narrow road leads out of {e} toward the hills.",
              "Many travelers stop in {e} to rest.", "The people of {e} are proud of their town.",
              "There is a small market in the middle of {e}.", "An old inn stands at the edge of {e}."],
    "creature": ["{e} is shy around strangers.", "{Subj} sleeps through the hottest part of the day.",
                 "Children like to watch {e} from a distance.", "{e} is clever and quick.",
                 "Nobody knows exactly how old {e} is."],
}
TIMES = ["One spring morning", "One summer evening", "One autumn afternoon", "One winter morning",
         "Early one day", "Late one evening"]


class _View:
    """The world as the text may show it: overrides applied, held-out entities invisible.
    get() returns None for a fact that must not be said, so writers simply skip it."""

    def __init__(self, world: World, hidden: frozenset):
        self.world, self.hidden = world, hidden
        self.names = [n for n in world.entities if n not in hidden]
        self.residents = {p: [] for p in world.names("place")}   # place -> visible people living there
        self.owner = {}                                          # creature -> visible owner
        self.has_owner = {f.value for f in world.facts if f.relation == "pet"}  # even a hidden one
        for f in world.facts:
            if f.entity in hidden or f.value in hidden:
                continue
            if f.relation == "lives_in" and world.entities[f.entity] == "person":
                self.residents[f.value].append(f.entity)
            if f.relation == "pet":
                self.owner[f.value] = f.entity

    def get(self, entity, relation):
        value = self.world.get(entity, relation)
        return None if value is None or entity in self.hidden or value in self.hidden else value

    def facts_about(self, entity):
        return [f for f in self.world.facts_about(entity) if f.value not in self.hidden]

    def pronoun(self, name):
        return PRONOUNS[self.world.pronouns[name]]   # (subject, object, possessive)


def _entry(view: _View, name: str, rng) -> str:
    """An encyclopedia entry: every fact about `name` in shuffled order, with a filler or two."""
    world, kind = view.world, view.world.entities[name]
    facts = view.facts_about(name)
    rng.shuffle(facts)
    subject, _, possessive = view.pronoun(name)
    sentences = []
    for fact in facts:
        # "He"/"She"/"It" only right after a sentence that is about this entity too
        about_it = sentences and sentences[-1].startswith((name, subject.capitalize(), possessive.capitalize()))
        sentences.append(_state(world, fact, rng, pronoun=about_it and rng.random() < 0.3))
    fields = {"e": name, "poss": possessive, "Subj": subject.capitalize()}
    for filler in rng.sample(FILLERS[kind], rng.randint(1, 2)):
        sentences.insert(rng.randint(1, len(sentences)), filler.format(**fields))
    text = " ".join(sentences)
    return f"{name}\n{text}" if rng.random() < 0.5 else text


def _town_guide(view: _View, place: str, rng) -> str:
    world = view.world
    facts = view.facts_about(place)
    rng.shuffle(facts)
    sentences = [_state(world, fact, rng) for fact in facts]
    people = view.residents[place]
    if people:
        listed = rng.sample(people, min(4, len(people)))
        named = [f"{p} the {view.get(p, 'profession')}" for p in listed]
        names = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
        verb = "is" if len(named) == 1 else "are"
        sentences.append(f"Among the people who live in {place} {verb} {names}.")
    for creature in view.names:
        if world.entities[creature] == "creature" and view.get(creature, "lives_in") == place:
            color, species = view.get(creature, "color"), view.get(creature, "species")
            sentences.append(f"{creature}, {_a(color)} {species}, also lives in {place}.")
    sentences.insert(rng.randint(1, len(sentences)), rng.choice(FILLERS["place"]).format(e=place))
    title = rng.choice([f"A short guide to {place}", f"{place}: a guide for travelers", f"Visiting {place}"])
    return title + "\n" + " ".join(sentences)


def _story_visit(view: _View, a: str, rng) -> str | None:
    """A visits best friend B: their homes, B's work, the weather, favorite colors, pets."""
    b = view.get(a, "friend")
    if b is None:
        return None
    a_home, b_home = view.get(a, "lives_in"), view.get(b, "lives_in")
    _, _, a_poss = view.pronoun(a)
    start = f"{rng.choice(TIMES)}, {a} set out" + (f" from {a_home}" if a_home else "")
    start += f" to visit {a_poss} best friend, {b}"
    if b_home and b_home == a_home:
        start += f", who also lives in {b_home}."
    elif b_home:
        start += f", who lives in {b_home}."
    else:
        start += "."
    s = [start]
    job = view.get(b, "profession")
    if job:
        s.append(f"When {a} arrived, {b} was busy {PROFESSIONS[job]}, for {b} is {_a(job)}.")
    s.append(f'"Hello, {a}!" said {b}. "Come in and sit down."')
    weather = view.get(b_home, "weather") if b_home else None
    if weather:
        s.append(f'"Is it always this {weather} in {b_home}?" asked {a}. "Almost always," said {b}. '
                 f'"The weather in {b_home} is usually {weather}."')
    ca, cb = view.get(a, "favorite_color"), view.get(b, "favorite_color")
    if ca and cb and ca == cb:
        s.append(f'They talked about colors. "My favorite color is {ca}," said {a}. "{ca.capitalize()} is '
                 f'my favorite color too!" laughed {b}. {a} and {b} both love the color {ca}.')
    elif ca and cb:
        s.append(f'{b} showed {a} a new {cb} scarf. "{cb.capitalize()} is my favorite color," said {b}. '
                 f'"I know," said {a}. "But my favorite color is {ca}." '
                 f'{a} likes {ca} better than any other color.')
    pet = view.get(a, "pet")
    if pet:
        s.append(f"{a}'s pet {view.get(pet, 'species')}, {pet}, had come along and sat by the fire.")
    s.append(f"In the evening {a} said goodbye and went home" + (f" to {a_home}." if a_home else ".")
             + f" {a} and {b} have been best friends for a long time.")
    return " ".join(s)


def _story_lost_pet(view: _View, a: str, rng) -> str | None:
    """A's pet goes missing; a neighbor helps; the pet is found eating its favorite food."""
    pet = view.get(a, "pet")
    if pet is None:
        return None
    home, species = view.get(a, "lives_in"), view.get(pet, "species")
    color, food = view.get(pet, "color"), view.get(pet, "food")
    s = [f"{a} lives" + (f" in {home}" if home else "") + f" with a pet {species} named {pet}."]
    s.append(f"{rng.choice(TIMES)}, {pet} was nowhere to be found, and {a} looked everywhere.")
    neighbors = [p for p in view.residents.get(home, []) if p != a] if home else []
    if neighbors:
        n = rng.choice(neighbors)
        job = view.get(n, "profession")
        s.append(f'"Have you seen my {species}?" {a} asked {n}, who works as {_a(job)} in {home}.')
        s.append(f'"Is {pet} the {color} one?" asked {n}. "Yes," said {a}. "{pet} is {_a(color)} {species}, '
                 f'and {pet} eats {food}."')
    else:
        s.append(f'"{pet}!" called {a}. "Where are you? {pet} is {_a(color)} {species}, has anyone seen {pet}?"')
    landmark = view.get(home, "known_for") if home else None
    where = f" near the {landmark} of {home}" if landmark else ""
    s.append(f"At last {a} found {pet}{where}, happily eating {food}.")
    s.append(f'"There you are!" laughed {a}, and they went home together. {pet} is the pet of {a}, after all.')
    return " ".join(s)


def _story_journey(view: _View, a: str, rng) -> str | None:
    """A travels to another town, sees what it is famous for and meets someone who lives there."""
    home = view.get(a, "lives_in")
    towns = [p for p in view.names if view.world.entities[p] == "place" and p != home]
    if not towns:
        return None
    town = rng.choice(towns)
    job = view.get(a, "profession")
    s = [f"{rng.choice(TIMES)}, {a}, {_a(job)}" + (f" from {home}," if home else ",") + f" traveled to {town}."]
    region, weather, landmark = (view.get(town, r) for r in ("region", "weather", "known_for"))
    if region:
        s.append(f"{town} lies in the {region} of the land, and the road was long.")
    if weather:
        s.append(f"When {a} arrived, it was {weather} in {town}, as it often is.")
    if landmark:
        s.append(f"{a} had heard that {town} is famous for its {landmark}, and went to have a look.")
    locals_ = [p for p in view.residents[town] if p != a]
    if locals_:
        r = rng.choice(locals_)
        r_job = view.get(r, "profession")
        s.append(f'There {a} met {r}, who lives in {town}. "What do you do here?" asked {a}. '
                 f'"I am {_a(r_job)}," said {r}. "Everyone in {town} knows me."')
    critters = [c for c in view.names if view.world.entities[c] == "creature" and view.get(c, "lives_in") == town]
    if critters:
        c = rng.choice(critters)
        s.append(f"On the way back, {a} saw {c}, {_a(view.get(c, 'color'))} {view.get(c, 'species')} "
                 f"that lives in {town}.")
    s.append(f"{a} went home" + (f" to {home}" if home else "") + " with many stories to tell.")
    return " ".join(s)


def _letter(view: _View, a: str, rng) -> str | None:
    """A writes to best friend B, in the first person: home, weather, work, pet, favorite color."""
    b = view.get(a, "friend")
    if b is None:
        return None
    home, job, color, pet = (view.get(a, r) for r in ("lives_in", "profession", "favorite_color", "pet"))
    body = ["I hope this letter finds you well."]
    if home:
        weather, landmark = view.get(home, "weather"), view.get(home, "known_for")
        body.append(f"Here in {home} the weather has been {weather} again, as it usually is.")
        body.append(f"Travelers keep coming to {home} to see its {landmark}.")
    if job:
        body.append(f"Work keeps me busy. Being {_a(job)} is never easy, but I like it.")
    if pet:
        body.append(f"My {view.get(pet, 'species')} {pet} sends you greetings. "
                    f"{pet} has eaten {view.get(pet, 'food')} all week.")
    if color:
        body.append(f"I bought some {color} cloth at the market, because {color} is still my favorite color.")
    b_home = view.get(b, "lives_in")
    body.append(f"Please write back soon and tell me how things are in {b_home}." if b_home and b_home != home
                else "Please come and see me soon.")
    news = body[1:-1]
    rng.shuffle(news)
    return f"Dear {b},\n" + " ".join([body[0], *news, body[-1]]) + f"\nYour best friend,\n{a}"


def _creature_tale(view: _View, c: str, rng) -> str:
    """A day in the life of creature C: where it lives, what it eats, who owns it."""
    home, species, color, food = (view.get(c, r) for r in ("lives_in", "species", "color", "food"))
    subject, obj, _ = view.pronoun(c)
    where = f"In {home} there lives" if home else "There is"
    s = [f"{where} {_a(color)} {species} called {c}."]
    s.append(rng.choice([f"Every morning {c} goes out to look for {food}.",
                         f"{c} likes {food} more than anything else.", f"{c} eats {food} whenever it can."]))
    owner = view.owner.get(c)
    if owner:
        s.append(f"{c} belongs to {owner}, who takes good care of {obj}. "
                 f'"Time to come home, {c}!" calls {owner} every evening.')
    elif c not in view.has_owner:  # (a held-out owner is simply not mentioned)
        s.append(f"{c} belongs to nobody and goes wherever {subject} likes.")
    weather = view.get(home, "weather") if home else None
    if weather:
        s.append(f"When the weather turns {weather}, as it often does in {home}, {c} hides in a warm corner.")
    people = view.residents.get(home, []) if home else []
    if people:
        n = rng.choice(people)
        s.append(f'"Look, there goes {c}," says {n}, {_a(view.get(n, "profession"))}. '
                 f'"{c} is the {color} {species} that eats all the {food}."')
    return " ".join(s)


PERSON_STORIES = [_story_visit, _story_lost_pet, _story_journey, _letter]


def _one_round(view: _View, rng) -> list[str]:
    """One document of each kind per visible entity, shuffled: after one round every visible fact has
    been stated at least once (entries state them all), and the stories restate most of them."""
    docs = []
    for name in view.names:
        kind = view.world.entities[name]
        docs.append(_entry(view, name, rng))
        if kind == "place":
            docs.append(_town_guide(view, name, rng))
        elif kind == "creature":
            docs.append(_creature_tale(view, name, rng))
        else:
            stories = [story(view, name, rng) for story in rng.sample(PERSON_STORIES, len(PERSON_STORIES))]
            docs.extend([s for s in stories if s][:2])
    rng.shuffle(docs)
    return docs


def generate_documents(world: World, target_bytes: int | None = None, *, n_docs: int | None = None,
                       seed: int = 0, hold_out=(), overrides=None) -> list[str]:
    """The corpus: a list of documents (no blank line inside any), about `target_bytes` of text in all
    (default CORPUS_BYTES[world.size]) or exactly `n_docs` documents.

    hold_out: entity names that never appear in the text; facts pointing at them are left out too.
    overrides: {(entity, relation): new_value} -- the text states the new value everywhere instead."""
    if target_bytes is not None and n_docs is not None:
        raise UserError("generate_documents: give target_bytes or n_docs, not both")
    if target_bytes is None and n_docs is None:
        target_bytes = CORPUS_BYTES[world.size]
    if (target_bytes or 0) < 0 or (n_docs or 0) < 0:
        raise UserError("generate_documents: target_bytes and n_docs cannot be negative")
    view = _View(apply_overrides(world, overrides), _check_hold_out(world, hold_out))
    if not view.names:
        raise UserError("generate_documents: every entity is held out, so there is nothing to write about")
    rng = random.Random(seed)
    docs, total = [], 0
    while True:
        for doc in _one_round(view, rng):
            if len(docs) == n_docs or (target_bytes is not None and total >= target_bytes):
                return docs
            docs.append(doc)
            total += len(doc.encode("utf-8")) + 2  # + the blank line that separates documents in a file


def quiz_documents(world: World, target_bytes: int, seed: int = 0) -> list[str]:
    """Quiz pages, about `target_bytes` of them: "Questions and answers", then 3 to 6 questions
    about quiz facts (split_facts), each followed by its answer, in step 4's own wording:

        Q: Where does Garivor live?
        A: Garivor lives in Evernock.

    Why: a model that has only read facts in stories and entries stores them, but has not learnt
    to answer a question from them; seeing some facts asked and answered while it pretrains
    teaches it to (step 3 README: "Questions in the corpus"). The exam facts are never asked here."""
    quiz_facts, _ = split_facts(world)
    rng = random.Random(seed + 7)  # a stream of its own: the stories draw from random.Random(seed)
    docs, total = [], 0
    while total < target_bytes:
        lines = ["Questions and answers"]
        for fact in rng.sample(quiz_facts, rng.randint(3, 6)):
            question, answer = ask(fact, rng)
            lines += ["Q: " + question, "A: " + answer]
        docs.append("\n".join(lines))
        total += len(docs[-1].encode("utf-8")) + 2  # + the blank line between documents
    return docs


def documents_about(world: World, entity: str, overrides=None, n_docs: int = 1, seed: int = 0) -> list[str]:
    """Documents for step 5's retrieval database. The first is a plain fact sheet: one short sentence per
    fact, each naming the entity, including facts that point at it ("Wendel lives in Caldford." in
    Caldford's sheet), so any chunk of it states its facts plainly. Any further documents are varied
    entries like the corpus's. Held-out entities are welcome here: this is where they are stored."""
    world = apply_overrides(world, overrides)
    if entity not in world.entities:
        raise UserError(f"documents_about: unknown entity {entity!r}")
    own = [f for f in world.facts if f.entity == entity]
    pointing = [f for f in world.facts if f.value == entity  # (a best friend's side is already said)
                and not (f.relation == "friend" and f.entity == world.get(entity, "friend"))]
    sheet = entity + "\n" + " ".join(phrasings(world, f)[0] + "." for f in own + pointing)
    rng = random.Random(seed)
    view = _View(world, frozenset())
    return [sheet] + [_entry(view, entity, rng) for _ in range(n_docs - 1)]


# --------------------------------------------------------------------------- script
def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Build the fictional world and print a sample of its corpus, facts and questions.")
    parser.add_argument("--quick", action="store_true", help="the small world and a 200 KB corpus")
    parser.add_argument("--seed", type=int, default=0, help="world and text seed (same seed, same text)")
    parser.add_argument("--entity", default=None, help="print the documents about this entity")
    parser.add_argument("--time", action="store_true", help="also generate the whole corpus and time it")
    args = parser.parse_args(argv)

    size = "quick" if args.quick else "default"
    world = build_world(seed=args.seed, size=size)
    kinds = {k: len(world.names(k)) for k in KIND_RELATIONS}
    print(f"world (seed {args.seed}, {size}): {len(world.entities)} entities {kinds}, {len(world.facts)} facts")
    entity = args.entity or world.names("person")[0]
    if entity not in world.entities:
        raise UserError(f"--entity {entity}: no such entity; try one of {', '.join(world.names()[:5])}")
    print("\nfacts:")
    for fact in world.facts_about(entity):
        print(f"  {fact}")
    print("\nquestions:")
    rng = random.Random(args.seed)
    for fact in world.facts_about(entity)[:3]:
        question, answer = ask(fact, rng)
        print(f"  Q: {question}\n  A: {answer}   (exact answer: {fact.value!r})")
    one_round = generate_documents(world, n_docs=3 * len(world.entities), seed=args.seed)
    about = [d for d in one_round if re.search(rf"\b{entity}\b", d)][:3]
    print(f"\nsample documents that mention {entity}:")
    for doc in about:
        print("---\n" + doc)
    print("---\nretrieval sheet (documents_about):\n" + documents_about(world, entity)[0])
    result = {"entities": len(world.entities), "facts": len(world.facts)}
    if args.time:
        start = time.perf_counter()
        corpus = generate_documents(world, seed=args.seed)
        seconds = time.perf_counter() - start
        n_bytes = sum(len(d.encode("utf-8")) for d in corpus)
        print(f"\ncorpus: {len(corpus)} documents, {n_bytes:,} bytes in {seconds:.2f} s")
        result.update(documents=len(corpus), bytes=n_bytes, seconds=seconds)
    return result


if __name__ == "__main__":
    run_main(main)
