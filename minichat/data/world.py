"""The built-in corpus: a small generated world of people, places, things, stories and arithmetic in words.

It needs no download, is deterministic for a seed, and gives a fresh install something real to learn from.
"""
from __future__ import annotations

import random
from typing import Iterator

FIRST = ["Ada", "Ben", "Cora", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena", "Milo",
         "Nora", "Otto", "Pia", "Quinn", "Rosa", "Sam", "Tess", "Uma", "Vic", "Wren", "Yara", "Zed"]
PLACES = ["Ashford", "Brookvale", "Cedar Hill", "Dunmore", "Elmstead", "Fernwick", "Glenrock", "Harbor Point",
          "Ivywood", "Juniper Bay", "Kingsbridge", "Larkfield", "Millbrook", "Northgate", "Oakridge"]
JOBS = ["baker", "teacher", "farmer", "doctor", "painter", "sailor", "carpenter", "librarian", "gardener",
        "musician", "engineer", "nurse", "writer", "pilot", "chef"]
THINGS = {"apple": "red", "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "lemon": "yellow",
          "orange": "orange", "plum": "purple", "cloud": "grey", "rose": "pink"}
PETS = ["cat", "dog", "rabbit", "parrot", "turtle", "goat", "horse", "hamster"]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0..999 in English words ("twenty two", "one hundred and five")."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


class World:
    """People with a home, a job, a pet and an age; the facts every generated text agrees with."""

    def __init__(self, seed: int = 0, n_people: int = 60):
        rng = random.Random(seed)
        self.people = []
        names = [f"{f} {l}" for f in FIRST for l in ("Smith", "Reed", "Hale", "Moss", "Park", "Vale")]
        for name in rng.sample(names, n_people):
            self.people.append({
                "name": name, "place": rng.choice(PLACES), "job": rng.choice(JOBS),
                "pet": rng.choice(PETS), "age": rng.randint(18, 80),
            })

    def facts(self, p: dict) -> list[str]:
        return [
            f"{p['name']} lives in {p['place']}.",
            f"{p['name']} works as a {p['job']}.",
            f"{p['name']} has a {p['pet']}.",
            f"{p['name']} is {number_words(p['age'])} years old.",
        ]


def _story(rng: random.Random, w: World) -> str:
    a, b = rng.sample(w.people, 2)
    thing, color = rng.choice(list(THINGS.items()))
    return (f"One day {a['name']} walked from {a['place']} to {b['place']} to visit {b['name']}. "
            f"{b['name']}, who works as a {b['job']}, showed {a['name']} a {color} {thing}. "
            f"They talked about {a['name']}'s {a['pet']} until the sun went down, and then "
            f"{a['name']} went home happy.")


def _arithmetic(rng: random.Random) -> str:
    x, y = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"{number_words(x)} plus {number_words(y)} is {number_words(x + y)}."
    x, y = max(x, y), min(x, y)
    return f"{number_words(x)} minus {number_words(y)} is {number_words(x - y)}."


def builtin_corpus(seed: int = 0, n_docs: int = 4000) -> Iterator[str]:
    rng = random.Random(seed + 1)
    w = World(seed)
    for _ in range(n_docs):
        r = rng.random()
        if r < 0.4:
            p = rng.choice(w.people)
            facts = w.facts(p)
            rng.shuffle(facts)
            yield " ".join(facts)
        elif r < 0.7:
            yield _story(rng, w)
        elif r < 0.9:
            yield " ".join(_arithmetic(rng) for _ in range(3))
        else:
            thing, color = rng.choice(list(THINGS.items()))
            yield f"The {thing} is {color}. Everyone knows that the colour of the {thing} is {color}."
