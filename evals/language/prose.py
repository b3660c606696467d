"""A procedural prose generator: seeded, endless, digit-free English text for long-context haystacks.

Every template and word list below was written for this project, so the generated text is the
project's own and may be redistributed under its Apache-2.0 licence (no third-party corpus is used).

The text reads like a loose chronicle of a small coastal town: each paragraph follows one resident
through a place, a season and an errand, with a few reflective sentences mixed in. Sentences are
grammatical and varied but carry no facts that a question could rely on; task generators insert their
own "needles" between sentences. The generator never emits digits, so numeric answers planted by a
task occur nowhere else in the haystack.

    >>> gen = ProseGenerator(seed=3)
    >>> text = gen.paragraph()
    >>> any(ch.isdigit() for ch in text)
    False
"""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["ProseGenerator", "RESIDENTS", "sentences", "invented_name"]

RESIDENTS = (
    "Ada", "Bram", "Celia", "Dorian", "Edda", "Felix", "Greta", "Hollis", "Ines", "Jonah", "Kira", "Lionel",
    "Marta", "Nils", "Odette", "Pavel", "Quinn", "Rosalind", "Silas", "Tamsin", "Ulric", "Vera", "Wendel",
    "Yara", "Zeno", "Agnes", "Basil", "Clara", "Emil", "Frieda",
)  # fmt: skip

_PRONOUN = {n: ("she", "her") if n in {
    "Ada", "Celia", "Edda", "Greta", "Ines", "Kira", "Marta", "Odette", "Rosalind", "Tamsin", "Vera", "Yara",
    "Agnes", "Clara", "Frieda",
} else ("he", "his") for n in RESIDENTS}  # fmt: skip
_PRONOUN["Quinn"] = ("they", "their")

_PLACES = (
    "harbour wall", "old market", "lighthouse path", "bakery on the corner", "chapel garden", "rope works",
    "fish auction hall", "library reading room", "orchard above the town", "salt marsh", "ferry landing",
    "boatyard", "school courtyard", "tea room by the bridge", "weaver's workshop", "cliff meadow",
    "cobbled square", "lantern shop", "mill pond", "town hall steps", "allotment gardens", "bell tower",
    "post office", "dune path", "pier", "river bend", "greenhouse behind the inn", "station platform",
)  # fmt: skip
_SEASON = (
    "early spring", "late spring", "the height of summer", "a wet autumn", "the first frost", "deep winter",
    "the dry weeks of August", "the long evenings of June", "a grey November", "the thaw",
)  # fmt: skip
_TIME = (
    "Early in the morning", "Just after dawn", "Around midday", "Late in the afternoon", "In the evening",
    "Shortly before dusk", "Long after dark", "On the first market day of the month", "One quiet Sunday",
    "During the storm week", "While the tide was out", "When the church bell rang noon",
)  # fmt: skip
_WEATHER = (
    "a thin rain drifted in from the sea", "the wind smelled of seaweed and tar", "fog sat low over the roofs",
    "the sun came and went behind fast clouds", "the air was still and heavy", "frost silvered the railings",
    "gulls argued above the chimneys", "the light turned the water the colour of pewter",
    "a warm breeze carried the scent of cut grass", "sleet tapped against every window",
)  # fmt: skip
_ERRAND = (
    "to return a borrowed ladder", "to buy thread and candles", "to mend a torn sail", "to deliver a basket of pears",
    "to ask about a missing letter", "to repaint a faded sign", "to collect a repaired clock",
    "to measure the old fence", "to sketch the boats", "to look for a lost cat", "to sell a box of honey jars",
    "to carry soup to a neighbour", "to tune the chapel organ", "to sort a crate of old books",
    "to argue about the price of coal", "to plant a row of beans", "to check the storm shutters",
)  # fmt: skip
_OBJECT = (
    "a chipped blue teapot", "a bundle of letters", "a brass compass", "a jar of plum jam", "a wooden recorder",
    "a folded map of the coast", "a pair of borrowed boots", "a basket of eggs", "a coil of rope",
    "a notebook with a cracked spine", "a lantern with smoked glass", "a paper bag of apples", "a knitted scarf",
    "a pot of geraniums", "a tin of buttons", "a fishing net that needed patching", "a clay jug",
)  # fmt: skip
_ADJ = (
    "patient", "restless", "cheerful", "thoughtful", "stubborn", "careful", "curious", "tired", "hopeful",
    "quiet", "talkative", "distracted", "gentle", "weary", "amused", "puzzled",
)  # fmt: skip
_FEELING = (
    "a small contentment", "an old worry", "a flicker of impatience", "a sudden fondness for the place",
    "the pleasant ache of a long walk", "a half-remembered tune", "a vague sense of having forgotten something",
    "the calm that follows hard work", "a wish to be somewhere warmer", "a quiet pride",
)  # fmt: skip
_REFLECT = (
    "Nothing in the town ever happened quickly, and most people preferred it that way.",
    "The older residents liked to say that the sea kept its own calendar.",
    "Conversations in that part of town tended to wander, and nobody minded.",
    "It was the kind of day that left no particular memory behind.",
    "Small towns keep their stories in the walls, or so the saying went.",
    "There was always one more chore waiting, however early one began.",
    "The same gulls seemed to follow the same boats year after year.",
    "Somewhere a door banged, and somewhere else a kettle began to sing.",
    "Neighbours nodded to one another without needing to stop.",
    "The shop bells along the street rang one after another like a slow scale.",
    "Every path in the town eventually led back down to the water.",
    "Such days passed unremarked, which was perhaps their chief virtue.",
)  # fmt: skip
_TALK = (
    "the price of bread", "the state of the harbour wall", "a wedding planned for the autumn",
    "whether the ferry would run on time", "the new schoolteacher", "the best way to smoke mackerel",
    "an argument at the last council meeting", "a rumour about the empty house on the hill",
    "the poor crop of apples", "a song nobody could remember the end of", "the weather, as always",
)  # fmt: skip

_OPENERS = (
    "{time}, {name} went down to the {place} {errand}.",
    "{time}, {name} set out for the {place} {errand}, carrying {object}.",
    "{name} spent most of {season} going back and forth to the {place}.",
    "{time}, {name} left the house {errand}.",
    "That year {name} had promised {other} to come by the {place} {errand}.",
    "{name} had lived near the {place} for as long as anyone could remember.",
)  # fmt: skip

_TEMPLATES = (
    "{time}, {name} went down to the {place} {errand}.",
    "It was {season}, and {weather}.",
    "Along the way {pron} passed the {place2}, where {weather}.",
    "{name} stopped to talk with {other} about {talk}.",
    "{other} had opinions about {talk}, and {name} listened with {feeling}.",
    "{Pron} felt {feeling} and walked a little more slowly.",
    "At the {place2} {pron} set down {object} and rested for a while.",
    "{other}, who was {adj} that day, offered to help.",
    "{name} was {adj} by nature, though few people noticed it.",
    "{Pron} remembered {season} years before, when {weather}.",
    "The walk back took longer than expected, because {weather}.",
    "By the time {pron} reached the {place2}, {weather}.",
    "{Poss} neighbour {other} waved from a window above the {place2}.",
    "{name} decided that the errand could wait until the next day.",
    "{Pron} found {object} exactly where it had been left.",
    "{reflect}",
    "{reflect}",
    "On the way home {name} thought about {talk} and felt {feeling}.",
    "Nobody at the {place} seemed surprised when {name} came by {errand}.",
)  # fmt: skip

_SYLLABLES = (
    "bar", "vel", "mor", "tin", "ska", "lor", "dun", "mer", "ath", "qui", "zel", "ran", "dor", "fen", "gal",
    "hol", "ist", "kev", "lum", "nor", "ost", "pel", "rua", "sen", "tor", "ulv", "wyn", "yor", "bri", "cas",
)  # fmt: skip


def invented_name(rng: random.Random, syllables: int = 3) -> str:
    """A capitalised made-up word (e.g. ``Velmordun``) that the prose never uses."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


class ProseGenerator:
    """Seeded stream of sentences and paragraphs. Same seed, same text.

    Args:
        seed: random seed.
        residents: names the prose may mention (tasks can exclude the names their needles use).
    """

    def __init__(self, seed: int = 0, residents: tuple[str, ...] | None = None) -> None:
        self.rng = random.Random(seed)
        self.residents = tuple(residents) if residents is not None else RESIDENTS
        if len(self.residents) < 2:
            raise ValueError("need at least two residents")

    def _fill(self, template: str, name: str) -> str:
        r = self.rng
        pron, poss = _PRONOUN.get(name, ("they", "their"))
        other = r.choice([n for n in self.residents if n != name])
        fields = {
            "time": r.choice(_TIME),
            "name": name,
            "other": other,
            "place": r.choice(_PLACES),
            "place2": r.choice(_PLACES),
            "errand": r.choice(_ERRAND),
            "object": r.choice(_OBJECT),
            "season": r.choice(_SEASON),
            "weather": r.choice(_WEATHER),
            "talk": r.choice(_TALK),
            "feeling": r.choice(_FEELING),
            "adj": r.choice(_ADJ),
            "reflect": r.choice(_REFLECT),
            "pron": pron,
            "Pron": pron.capitalize(),
            "Poss": poss.capitalize(),
        }
        text = template.format(**fields)
        return text[0].upper() + text[1:]

    def sentence(self, name: str | None = None, opener: bool = False) -> str:
        """One sentence about ``name`` (or a random resident); ``opener``: one that names them first."""
        name = name if name is not None else self.rng.choice(self.residents)
        return self._fill(self.rng.choice(_OPENERS if opener else _TEMPLATES), name)

    def paragraph(self, n_sentences: int | None = None) -> str:
        """A paragraph of 4 to 7 sentences that follows one resident."""
        n = n_sentences if n_sentences is not None else self.rng.randint(4, 7)
        name = self.rng.choice(self.residents)
        return " ".join(self.sentence(name, opener=i == 0) for i in range(n))

    def sentences(self) -> Iterator[str]:
        """Endless sentences; a paragraph break is signalled by a sentence that ends with a newline."""
        while True:
            n = self.rng.randint(4, 7)
            name = self.rng.choice(self.residents)
            for i in range(n):
                s = self.sentence(name, opener=i == 0)
                yield s + "\n" if i == n - 1 else s


def sentences(seed: int = 0, residents: tuple[str, ...] | None = None) -> Iterator[str]:
    """Shorthand for ``ProseGenerator(seed, residents).sentences()``."""
    return ProseGenerator(seed, residents).sentences()
