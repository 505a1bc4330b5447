"""Synthetic English product reviews of mixed sentiment, generated from a seed.

The embedded default learns to write these, so its samples are readable review
sentences; a review opening is a prompt and the rest is the response. Openings
carry no sentiment, so the warm-started policy writes positive, negative and
mixed continuations about equally often, which is what leaves DPO with a VADER
judge something to learn. Pure Python, deterministic for a given seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# (product, one of its parts, the verb that agrees with the part)
PRODUCTS = [
    ("blender", "motor", "is"), ("coffee maker", "carafe", "is"), ("desk lamp", "switch", "is"),
    ("backpack", "zipper", "is"), ("kettle", "handle", "is"), ("vacuum cleaner", "filter", "is"),
    ("phone case", "edge", "is"), ("toaster", "lever", "is"), ("office chair", "armrest", "is"),
    ("water bottle", "lid", "is"), ("rice cooker", "inner pot", "is"), ("keyboard", "keys", "are"),
    ("pair of headphones", "ear cushions", "are"), ("frying pan", "coating", "is"),
    ("umbrella", "frame", "is"), ("hair dryer", "cord", "is"), ("yoga mat", "surface", "is"),
    ("bike light", "battery", "is"), ("alarm clock", "display", "is"), ("tent", "poles", "are"),
    ("pair of running shoes", "soles", "are"), ("electric toothbrush", "charger", "is"),
    ("wall clock", "hands", "are"), ("mixing bowl set", "rims", "are"), ("camera bag", "strap", "is"),
    ("space heater", "thermostat", "is"), ("suitcase", "wheels", "are"), ("cutting board", "edges", "are"),
]

OPENINGS = [
    "I bought this {p} last month and",
    "I ordered this {p} for my kitchen and",
    "My sister gave me this {p} for my birthday and",
    "After using this {p} for a week,",
    "I have had this {p} for about a year and",
    "We picked up this {p} on sale and",
    "I was looking for a new {p} and",
    "This is my second {p} from this brand and",
    "I needed a {p} for a trip, so I tried this one and",
    "My old {p} finally died, so I bought this one and",
    "I use this {p} every day and",
    "I got this {p} as a gift for my dad and",
]

POSITIVE_FIRST = [
    "it works great.", "I love it.", "it is excellent.", "it is wonderful.",
    "I am really happy with it.", "it has been fantastic.", "it is perfect for me.",
    "I am very pleased with it.", "it exceeded my expectations.", "it is the best one I have owned.",
]
NEGATIVE_FIRST = [
    "it is terrible.", "I hate it.", "it broke after two days.", "it is awful.",
    "I am very disappointed.", "it was a waste of money.", "it is useless.",
    "it stopped working and I am angry.", "it is the worst one I have owned.", "it is really bad.",
]
POSITIVE_MORE = [
    "The {q} {be} solid and sturdy.", "The {q} {be} perfect.",
    "It looks beautiful on the counter.", "Setup was easy and quick.",
    "The quality is excellent for the price.", "My family loves it too.",
    "It is comfortable and easy to use.", "The {q} {be} strong and reliable.",
    "Customer service was friendly and helpful.", "It is a great value.",
    "I would happily buy it again.", "I highly recommend it.",
    "Five stars, no complaints.", "It makes every morning nicer.",
]
NEGATIVE_MORE = [
    "The {q} {be} cheap and broke quickly.", "The {q} {be} flimsy and useless.",
    "It looks ugly and poorly made.", "Setup was confusing and annoying.",
    "The quality is poor for the price.", "My family hates it too.",
    "It is uncomfortable and hard to use.", "The {q} {be} weak and unreliable.",
    "Customer service was rude and unhelpful.", "It is a terrible value.",
    "I regret buying it.", "I would not recommend it.",
    "One star, a total failure.", "It makes every morning worse.",
]
NEUTRAL_MORE = [
    "It arrived on a Tuesday in a plain box.", "The {q} {be} about what I expected.",
    "It comes in three colors.", "I use it mostly on weekends.",
    "The manual is short.", "It is smaller than it looks in the photos.",
]
MIXED_FIRST = [
    "it is fine but not great.", "it has good and bad points.",
    "I have mixed feelings about it.",
]

KINDS = ("positive", "negative", "mixed")


@dataclass(frozen=True)
class Review:
    prompt: str
    response: str
    kind: str
    product: str


def _sentences(rng: random.Random, pool: list[str], k: int, part: tuple[str, str]) -> list[str]:
    return [s.format(q=part[0], be=part[1]) for s in rng.sample(pool, k)]


def make_review(rng: random.Random) -> Review:
    product, *part = rng.choice(PRODUCTS)
    prompt = rng.choice(OPENINGS).format(p=product)
    kind = rng.choice(KINDS)
    if kind == "positive":
        body = [rng.choice(POSITIVE_FIRST)] + _sentences(rng, POSITIVE_MORE, rng.randint(1, 2), part)
    elif kind == "negative":
        body = [rng.choice(NEGATIVE_FIRST)] + _sentences(rng, NEGATIVE_MORE, rng.randint(1, 2), part)
    else:
        body = [rng.choice(MIXED_FIRST)] + _sentences(rng, POSITIVE_MORE, 1, part) + _sentences(
            rng, NEGATIVE_MORE, 1, part)
        rng.shuffle(body[1:])
    if rng.random() < 0.3:
        body.insert(rng.randint(1, len(body)), _sentences(rng, NEUTRAL_MORE, 1, part)[0])
    return Review(prompt=prompt, response=" " + " ".join(body), kind=kind, product=product)


def make_reviews(n: int, seed: int) -> list[Review]:
    rng = random.Random(seed)
    return [make_review(rng) for _ in range(n)]


def make_prompts(seed: int) -> list[str]:
    """Every distinct opening, shuffled by the seed: the prompt set."""
    prompts = [o.format(p=p) for p, _, _ in PRODUCTS for o in OPENINGS]
    random.Random(seed).shuffle(prompts)
    return prompts
