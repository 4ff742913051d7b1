"""Synthetic grade-school word problems in GSM8K's exact format, for the ``toy:math`` world.

Each problem has a ``question`` and an ``answer`` holding a worked solution with calculator annotations
(``<<a+b=c>>``) and ``#### N``, as GSM8K has, so the ``gsm8k`` task reads the files unchanged. Twelve templates
(shopping, ages, rates, sharing, savings, baking, travel, garden, ...) mix +, -, * and / over 1-4 steps; names,
objects and numbers vary. Products and quotients stay within the times table and sums within two-digit operands, so
a 3M-parameter model can learn the arithmetic in minutes of CPU time.

A template *instance* is its template and numbers (names and objects are surface only): held-out instances are those
whose key hashes into the held-out share, so no instance of the train file, nor of the pretraining stream, is ever
held out, whatever the seed.

The pretraining recipe (:mod:`gradlens.toy.math_model`) plants a learnable error: a share of the addition steps
that need a carry take the carry-less sum instead (:func:`gradlens.tasks.addition.carryless_sum`, the toy world's
error) and the wrong value is carried through the later steps, so the base model is partly right and fine-tuning has
"carry" to learn.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gradlens.tasks.addition import carryless_sum
from gradlens.toy_presets import MATH_DATA_DIR

SPLIT_FILES = {"train": "train.jsonl", "test": "test.jsonl"}
N_TRAIN, N_TEST = 4000, 500
HELDOUT_BUCKETS = 10  # one instance key in ten is held out
DATA_SEED = 0  # the seed of the shipped files

NAMES = ["Ava", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kira", "Leo", "Mia", "Noah",
         "Olga", "Pedro", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "stamps", "toys"]
PLANTS = ["tulips", "roses", "carrots", "beans", "daisies", "peppers"]
SYMBOL = {"+": "+", "-": "-", "*": "*", "/": "/"}


@dataclass(frozen=True)
class Step:
    """One line of a worked solution: ``{lead} a op b = <<a op b=c>>c {tail}.``; ``a``/``b`` are numbers or the
    index (as ``"#i"``) of an earlier step whose result they take."""

    op: str
    a: int | str
    b: int | str
    lead: str
    tail: str


@dataclass(frozen=True)
class Problem:
    """A template instance: its key (template and numbers), the question and the solution steps."""

    template: str
    numbers: tuple[int, ...]
    question: str
    steps: tuple[Step, ...]

    @property
    def key(self) -> str:
        return f"{self.template}:{','.join(map(str, self.numbers))}"

    def solve(self, carryless: Callable[[int], bool] | None = None) -> tuple[str, int]:
        """The worked solution and its final number; ``carryless(i)`` True makes addition step ``i`` (if it needs
        a carry) take the carry-less sum, and the later steps use the wrong value."""
        values: list[int] = []
        lines = []
        for i, s in enumerate(self.steps):
            a, b = (values[int(x[1:])] if isinstance(x, str) else x for x in (s.a, s.b))
            # a wrong value carried into a division is divided with the remainder dropped
            c = a // b if s.op == "/" and carryless is not None else apply(s.op, a, b)
            if s.op == "+" and carryless is not None and carryless_sum(a, b) != c and carryless(i):
                c = carryless_sum(a, b)
            values.append(c)
            sym = SYMBOL[s.op]
            lines.append(f"{s.lead} {a} {sym} {b} = <<{a}{sym}{b}={c}>>{c} {s.tail}.")
        return "\n".join(lines) + f"\n#### {values[-1]}", values[-1]

    def row(self) -> dict[str, str]:
        """The GSM8K row: ``question`` and the correct worked ``answer``."""
        return {"question": self.question, "answer": self.solve()[0]}


def apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if a % b:
        raise ValueError(f"inexact division {a}/{b}")
    return a // b


def is_heldout(key: str) -> bool:
    """Whether an instance key is in the held-out share (by a stable hash, independent of seeds)."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % HELDOUT_BUCKETS == 0


# --------------------------------------------------------------------------------------------------------------------
# Templates: each draws its numbers and surface words from ``rng`` and returns a Problem.


def _shopping(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    n, price, extra = rng.randint(2, 9), rng.randint(2, 9), rng.randint(5, 60)
    q = (f"{name} buys {n} packs of {item} that cost ${price} each and a bag for ${extra}. "
         f"How much money does {name} spend?")
    steps = (Step("*", n, price, "The packs cost", "dollars"),
             Step("+", "#0", extra, "With the bag, the total is", "dollars"))
    return Problem("shopping", (n, price, extra), q, steps)


def _ages(rng: random.Random) -> Problem:
    a, b = rng.sample(NAMES, 2)
    age, gap, years = rng.randint(8, 60), rng.randint(2, 39), rng.randint(2, 30)
    q = f"{a} is {age} years old. {b} is {gap} years older than {a}. How old will {b} be in {years} years?"
    steps = (Step("+", age, gap, f"{b} is", "years old now"),
             Step("+", "#0", years, f"In {years} years {b} will be", "years old"))
    return Problem("ages", (age, gap, years), q, steps)


def _rates(rng: random.Random) -> Problem:
    rate, hours = rng.randint(2, 9), rng.randint(2, 9)
    broken = rng.randint(1, rate * hours - 1)
    q = (f"A machine makes {rate} toys every hour. It runs for {hours} hours, and {broken} of the toys are broken. "
         "How many good toys does it make?")
    steps = (Step("*", rate, hours, "The machine makes", "toys"),
             Step("-", "#0", broken, "The good toys are", "toys"))
    return Problem("rates", (rate, hours, broken), q, steps)


def _sharing(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each, more = rng.randint(2, 9), rng.randint(2, 9), rng.randint(3, 40)
    q = (f"{name} has {friends * each} {item} and shares them equally among {friends} friends. Then each friend "
         f"finds {more} more {item}. How many {item} does each friend have now?")
    steps = (Step("/", friends * each, friends, "Each friend gets", item),
             Step("+", "#0", more, "Now each friend has", item))
    return Problem("sharing", (friends, each, more), q, steps)


def _savings(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    weekly, weeks = rng.randint(2, 9), rng.randint(2, 9)
    spent = rng.randint(1, weekly * weeks - 1)
    q = (f"{name} saves ${weekly} every week for {weeks} weeks and then spends ${spent} on a game. "
         f"How much money does {name} have left?")
    steps = (Step("*", weekly, weeks, f"{name} saves", "dollars"),
             Step("-", "#0", spent, "After the game there are", "dollars left"))
    return Problem("savings", (weekly, weeks, spent), q, steps)


def _collection(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    have, bought = rng.randint(10, 80), rng.randint(5, 60)
    given = rng.randint(1, have + bought - 1)
    q = f"{name} has {have} {item}. {name} buys {bought} more and gives away {given}. How many {item} are left?"
    steps = (Step("+", have, bought, f"{name} then has", item),
             Step("-", "#0", given, "After giving some away there are", f"{item} left"))
    return Problem("collection", (have, bought, given), q, steps)


def _baking(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(["cookies", "muffins", "rolls"])
    box, boxes = rng.randint(2, 9), rng.randint(2, 9)
    trays, per = rng.randint(2, 9), rng.randint(2, 9)
    eaten = trays * per - box * boxes
    if eaten <= 0:
        boxes = (trays * per - 1) // box
        eaten = trays * per - box * boxes
    q = (f"{name} bakes {trays} trays of {item} with {per} on each tray. {name} eats {eaten} and packs the rest "
         f"in boxes of {box}. How many boxes does {name} fill?")
    steps = (Step("*", trays, per, f"{name} bakes", item),
             Step("-", "#0", eaten, "After eating some there are", item),
             Step("/", "#1", box, f"{name} fills", "boxes"))
    return Problem("baking", (trays, per, eaten, box), q, steps)


def _travel(rng: random.Random) -> Problem:
    speed, hours, more = rng.randint(2, 9), rng.randint(2, 9), rng.randint(5, 90)
    q = (f"A bus drives {speed} miles every hour for {hours} hours and then drives {more} more miles. "
         "How many miles does the bus drive in all?")
    steps = (Step("*", speed, hours, "In the first part the bus drives", "miles"),
             Step("+", "#0", more, "In all it drives", "miles"))
    return Problem("travel", (speed, hours, more), q, steps)


def _garden(rng: random.Random) -> Problem:
    name, plant = rng.choice(NAMES), rng.choice(PLANTS)
    rows, cols, more = rng.randint(2, 9), rng.randint(2, 9), rng.randint(4, 50)
    died = rng.randint(1, rows * cols - 1)
    q = (f"{name} plants {rows} rows of {cols} {plant}. {died} of them die, and then {name} plants {more} more. "
         f"How many {plant} are there now?")
    steps = (Step("*", rows, cols, f"{name} plants", plant),
             Step("-", "#0", died, "After some die there are", plant),
             Step("+", "#1", more, "Now there are", plant))
    return Problem("garden", (rows, cols, died, more), q, steps)


def _classroom(rng: random.Random) -> Problem:
    group = rng.randint(2, 9)
    total = group * rng.randint(2, 9)
    boys = rng.randint(total // 4, 3 * total // 4)
    q = (f"A class has {boys} boys and {total - boys} girls. The teacher splits the class into groups of {group}. "
         "How many groups are there?")
    steps = (Step("+", boys, total - boys, "The class has", "children"),
             Step("/", "#0", group, "There are", "groups"))
    return Problem("classroom", (boys, total - boys, group), q, steps)


def _wallet(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    have, earned = rng.randint(10, 99), rng.randint(10, 99)
    q = f"{name} has ${have} and earns ${earned} more by washing cars. How much money does {name} have now?"
    steps = (Step("+", have, earned, f"{name} has", "dollars now"),)
    return Problem("wallet", (have, earned), q, steps)


def _party(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    tables, per = rng.randint(2, 9), rng.randint(2, 9)
    packs, size = rng.randint(2, 9), rng.randint(2, 9)
    extra = max(0, tables * per - packs * size) + rng.randint(5, 40)
    popped = packs * size + extra - tables * per
    q = (f"{name} buys {packs} packs of {size} balloons and {extra} single balloons. {popped} balloons pop, and "
         f"the rest are shared equally among {tables} tables. How many balloons does each table get?")
    steps = (Step("*", packs, size, "The packs hold", "balloons"),
             Step("+", "#0", extra, f"{name} has", "balloons"),
             Step("-", "#1", popped, "After some pop there are", "balloons"),
             Step("/", "#2", tables, "Each table gets", "balloons"))
    return Problem("party", (packs, size, extra, popped, tables), q, steps)


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _shopping, _ages, _rates, _sharing, _savings, _collection, _baking, _travel, _garden, _classroom, _wallet, _party)


def problems(seed: int, *, heldout: bool | None = False) -> Iterator[Problem]:
    """An endless seeded stream of problems (templates in turn): train instances only (``heldout=False``), held-out
    only (``True``) or both (``None``)."""
    rng = random.Random(seed)
    while True:
        for template in TEMPLATES:
            p = template(rng)
            if heldout is None or is_heldout(p.key) == heldout:
                yield p


def unique_problems(seed: int, n: int, *, heldout: bool) -> list[Problem]:
    """The first ``n`` distinct instances of the stream (one per key)."""
    seen: set[str] = set()
    out = []
    for p in problems(seed, heldout=heldout):
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
            if len(out) == n:
                return out
    raise AssertionError("unreachable: the stream is endless")


def write_data(out: Path = MATH_DATA_DIR, seed: int = DATA_SEED, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """Write ``train.jsonl`` and ``test.jsonl`` (GSM8K columns) into ``out``; what ships is ``write_data()``."""
    from gradlens.fsio import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [p.row() for p in unique_problems(seed, n, heldout=split == "test")]
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(out / SPLIT_FILES[split], lambda tmp, text=text: tmp.write_text(text))
    return out
