"""A small world of invented facts that drifts epoch by epoch.

Deterministic from (seed, epoch): the teacher, the traffic generator and the scorer all rebuild the
same world without sharing state. It knows nothing about models, Ray or HTTP.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

_SYLLABLES = ["zor", "vex", "qui", "lon", "bra", "dex", "mar", "tok", "fen", "rix", "pal", "dun",
              "kel", "sor", "vin", "tal", "gru", "nop", "lak", "wim", "cor", "bel", "hux", "jor"]
_KINDS = ["widget", "gadget", "service", "engine", "toolkit", "platform", "sensor", "module"]
_OWNERS = ["Alice Moreau", "Bram Osei", "Chen Wei", "Dana Kovac", "Elif Demir", "Farid Haddad",
           "Greta Lind", "Hugo Silva", "Ines Costa", "Jonas Berg", "Kira Novak", "Luca Ricci"]
_CITIES = ["Oslo", "Lima", "Perth", "Quito", "Riga", "Seoul", "Tunis", "Utrecht", "Vienna", "Windhoek"]

# Per attribute: question phrasings (the last one is held out for evaluation) and the answer.
_TEMPLATES: dict[str, tuple[list[str], str]] = {
    "price": (["What is the price of the {e}?", "How much does the {e} cost?",
               "Tell me the cost of the {e}.", "What does the {e} sell for?"],
              "The {e} costs {v}."),
    "owner": (["Who owns the {e}?", "Who is the owner of the {e}?",
               "Which person owns the {e}?", "The {e} belongs to whom?"],
              "The {e} is owned by {v}."),
    "city": (["Where is the {e} made?", "In which city is the {e} made?",
              "What city makes the {e}?", "Where does the {e} come from?"],
             "The {e} is made in {v}."),
    "version": (["What is the latest version of the {e}?", "Which version of the {e} is current?",
                 "What version is the {e} on now?", "What is the current release of the {e}?"],
                "The latest version of the {e} is {v}."),
}
ATTRIBUTES = list(_TEMPLATES)
NUM_TRAIN_PHRASINGS = 3


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str

    def question(self, phrasing: int) -> str:
        return _TEMPLATES[self.attribute][0][phrasing].format(e=self.entity)

    def answer(self) -> str:
        return _TEMPLATES[self.attribute][1].format(e=self.entity, v=self.value)

    def train_questions(self) -> list[str]:
        return [self.question(i) for i in range(NUM_TRAIN_PHRASINGS)]

    def heldout_question(self) -> str:
        return self.question(NUM_TRAIN_PHRASINGS)


def _value(rng: random.Random, attribute: str) -> str:
    if attribute == "price":
        return f"${rng.randint(10, 990)}"
    if attribute == "owner":
        return rng.choice(_OWNERS)
    if attribute == "city":
        return rng.choice(_CITIES)
    return f"{rng.randint(1, 9)}.{rng.randint(0, 19)}"


def _entity_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = (rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES)).capitalize() + " " + rng.choice(_KINDS)
        if name not in taken:
            taken.add(name)
            return name


class World:
    """The facts true at one epoch. `World(seed, epoch)` is the same object wherever it is built."""

    def __init__(self, seed: int, epoch: int, num_entities: int = 20, drift_fraction: float = 0.3,
                 new_per_epoch: int = 2):
        self.seed, self.epoch = seed, epoch
        rng = random.Random(seed)
        taken: set[str] = set()
        facts: dict[str, Fact] = {}
        for _ in range(num_entities):
            name = _entity_name(rng, taken)
            attr = rng.choice(ATTRIBUTES)
            facts[name] = Fact(name, attr, _value(rng, attr))
        self.changed: set[str] = set()
        for e in range(1, epoch + 1):
            erng = random.Random(f"{seed}/{e}")
            names = sorted(facts)
            changed = erng.sample(names, k=round(drift_fraction * len(names)))
            for name in changed:
                old = facts[name]
                value = old.value
                while value == old.value:
                    value = _value(erng, old.attribute)
                facts[name] = Fact(name, old.attribute, value)
            added = []
            for _ in range(new_per_epoch):
                name = _entity_name(erng, taken)
                attr = erng.choice(ATTRIBUTES)
                facts[name] = Fact(name, attr, _value(erng, attr))
                added.append(name)
            self.changed = set(changed) | set(added)
        self.facts = [facts[k] for k in sorted(facts)]
        self._by_question = {f.question(i).lower(): f for f in self.facts
                             for i in range(len(_TEMPLATES[f.attribute][0]))}

    def lookup(self, question: str) -> Fact | None:
        """The fact a question asks about, if it is one of the world's phrasings."""
        return self._by_question.get(_normalize(question))

    def answer(self, question: str) -> str:
        """The frontier's answer: the current fact, a general question's answer, or "I don't know."."""
        fact = self.lookup(question)
        if fact:
            return fact.answer()
        return general_answer(question) or "I don't know."

    def corpus(self) -> list[str]:
        """Every question and answer text of this epoch (used to build the tiny test tokenizer)."""
        out = []
        for f in self.facts:
            out += [f.question(i) for i in range(len(_TEMPLATES[f.attribute][0]))] + [f.answer()]
        return out


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip()).lower()


def is_correct(fact: Fact, answer: str) -> bool:
    """An answer is right when it states the fact's current value as a whole token: "$59" is not
    found in "$590", nor "3.1" in "3.15"."""
    return states(fact.value, answer)


def value_pattern(value: str) -> str:
    """The regular expression of an answer that states `value` as a whole token (case-insensitive)."""
    return rf"(?<![\w.$]){re.escape(value)}(?![\w]|\.\d)"


def states(value: str, answer: str) -> bool:
    return re.search(value_pattern(value), answer, flags=re.IGNORECASE) is not None


def training_rows(facts: list[Fact]) -> list[dict]:
    """What a cycle trains on for these facts: each training phrasing, answered as the teacher does."""
    return [{"messages": [{"role": "user", "content": q}], "completion": f.answer()}
            for f in facts for q in f.train_questions()]


# General questions the default student (SmolLM2-135M-Instruct) answers right before any cycle (15 of the
# 20 tried; it missed Italy, Spain, bees, lions, Russia): what a cycle must not make it forget. Never in
# traffic: the regression set. Each is (question, the value a right answer states, the teacher's answer).
GENERAL_QUESTIONS = [
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Germany?", "Berlin"),
    ("Which planet is the largest in our solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"), ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("What color is the sky on a clear day?", "blue"), ("What is the chemical formula of water?", "H2O"),
    ("Who wrote the novel 1984?", "Orwell"), ("What is the opposite of hot?", "cold"),
    ("Which gas do plants absorb from the air?", "carbon dioxide"),
    ("Who painted the Mona Lisa?", "Leonardo"),
]

# Routine traffic: everyday questions users ask that the default student already answers right (16 of the
# 24 tried, greedy, 24 tokens); a frontier teacher answers them too. What a student serves cheaply.
ROUTINE_QUESTIONS = [
    ("What is the capital of Canada?", "Ottawa"), ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of England?", "London"), ("How many days are in a week?", "7"),
    ("What is the largest mammal on Earth?", "blue whale"),
    ("Who developed the theory of relativity?", "Einstein"), ("What is the currency of Japan?", "yen"),
    ("What do bees collect from flowers?", "nectar"), ("Who wrote Hamlet?", "Shakespeare"),
    ("What is the largest desert in the world?", "Sahara"),
    ("What is the primary language spoken in Mexico?", "Spanish"), ("What is the capital of China?", "Beijing"),
    ("What gas do humans need to breathe?", "oxygen"), ("What is the capital of Australia?", "Canberra"),
    ("Who discovered penicillin?", "Fleming"), ("What is the main language spoken in France?", "French"),
]


def general_answer(question: str) -> str | None:
    """The frontier's answer to a general or routine question (None for any other question)."""
    value = _GENERAL_VALUES.get(_normalize(question))
    return None if value is None else f"{value}."


_GENERAL_VALUES = {_normalize(q): v for q, v in GENERAL_QUESTIONS + ROUTINE_QUESTIONS}
