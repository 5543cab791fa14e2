"""The labelled moderation corpus: EN and ZH-Hans prompts generated reproducibly from `corpus_vocab.yaml`.

Produces rows ``{"id", "lang", "label", "category", "evasion", "prompt"}`` (the eval file format). Unsafe
rows put a harmful phrase of a category into a prompt template and disguise it with one evasion kind;
safe rows are everyday subjects, look-alikes (a harm word in a harmless sense) and harmful topics in an
allowed framing, disguised the same way so that an evasion is not itself a signal. Aggravated framings
(prevention poster *with gore*) are unsafe. Every vocabulary list and the templates are split by
position (`_part`) into train, dev and test items, and each split is drawn only from its own items: the
test split shares no template and no key phrase with the others, so its figures say how moderation does
on wording it never saw, and the dev split is what thresholds and regularisation were chosen on.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import opencc
import yaml
from pypinyin import Style, lazy_pinyin

VOCAB_PATH = Path(__file__).parent / "corpus_vocab.yaml"
SPLIT_EVERY = 5  # see `_part`: 3 of every 5 items train, 1 dev, 1 test
CATEGORIES = (
    "sexual",
    "sexual_minors",
    "violence_gore",
    "hate",
    "self_harm",
    "weapons_drugs",
    "harassment_doxxing",
)
EVASIONS = {
    "en": ("plain", "spacing", "confusables", "leetspeak", "mixed", "fullwidth", "euphemism"),
    "zh": ("plain", "spacing", "leetspeak", "mixed", "fullwidth", "euphemism", "homophone", "traditional"),
}
_LEET = {"a": "4@", "e": "3", "i": "1!", "o": "0", "s": "5$", "t": "7", "l": "1", "g": "9"}
_SEPARATORS = (" ", ".", "-", "*", "_", " . ")
_HAN = re.compile("[\u4e00-\u9fff]")
_S2T = opencc.OpenCC("s2t")
_AGGRAVATED_CATEGORY = ("violence_gore", "sexual", None, "violence_gore")  # None: the topic's category
_GLORIFIABLE = ("violence_gore", "hate", "self_harm", "weapons_drugs")


@dataclass(frozen=True)
class Row:
    """One labelled prompt."""

    id: str
    lang: str
    label: str
    category: str
    evasion: str
    prompt: str

    def as_dict(self) -> dict[str, str]:
        """The row as one line of a labelled JSONL file holds it."""
        return {k: getattr(self, k) for k in ("id", "lang", "label", "category", "evasion", "prompt")}


def _part(items: list[Any], split: str) -> list[Any]:
    """The items of one split, by position: of every SPLIT_EVERY items, the last is test-only, the one
    before it dev-only (for choosing thresholds and regularisation), the rest train-only."""
    slot = {"test": SPLIT_EVERY - 1, "dev": SPLIT_EVERY - 2}.get(split)
    if slot is None:
        return [item for n, item in enumerate(items) if n % SPLIT_EVERY < SPLIT_EVERY - 2]
    return [item for n, item in enumerate(items) if n % SPLIT_EVERY == slot]


class _Generator:
    def __init__(self, vocab: dict[str, Any], split: str, rng: random.Random) -> None:
        self.vocab, self.split, self.rng = vocab, split, rng

    def pick(self, items: list[Any]) -> Any:
        return self.rng.choice(_part(items, self.split))

    def fill(self, phrase: str, lang: str) -> str:
        """Fill a phrase's {g} (group), {n} (name), {m} (minor) and {s} (sexual act) slots."""
        slots = {"g": "groups", "n": "names", "m": "minors", "s": "sexual_acts", "a": "adults"}
        for slot, key in slots.items():
            while "{" + slot + "}" in phrase:
                phrase = phrase.replace("{" + slot + "}", self.pick(self.vocab[key][lang]), 1)
        return phrase

    def template(self, lang: str) -> str:
        return str(self.pick(self.vocab["templates"][lang]))

    def harm(self, category: str, lang: str, euphemism: bool = False) -> str:
        lists = self.vocab["unsafe"][category]
        return self.fill(self.pick(lists[("euph_" if euphemism else "") + lang]), lang)

    # -- evasions: each disguises the phrase `x` (or the whole prompt) ----------------------------------

    def spaced(self, x: str) -> str:
        sep = self.rng.choice(_SEPARATORS)
        if _HAN.search(x):
            return sep.join(x) if len(x) <= 6 else sep.join(x[:4]) + x[4:]
        words = x.split()
        longest = max(range(len(words)), key=lambda n: len(words[n]))
        words[longest] = sep.join(words[longest])
        return " ".join(words)

    def confusable(self, x: str) -> str:
        table = self.vocab["confusables"]
        out = [self.rng.choice(table[c]) if c in table and self.rng.random() < 0.5 else c for c in x]
        if out == list(x):  # at least one letter swapped
            spots = [n for n, c in enumerate(x) if c in table]
            if spots:
                n = self.rng.choice(spots)
                out[n] = self.rng.choice(table[x[n]])
        return "".join(out)

    def leet(self, x: str) -> str:
        if _HAN.search(x):  # Chinese leetspeak: some characters written in pinyin or by initial
            chars = list(x)
            spots = [n for n, c in enumerate(chars) if _HAN.match(c)]
            for n in self.rng.sample(spots, k=max(1, len(spots) // 3)):
                syllable = lazy_pinyin(chars[n], style=Style.NORMAL)[0]
                chars[n] = syllable if self.rng.random() < 0.8 else syllable.upper()
            return "".join(chars)
        out = [self.rng.choice(_LEET[c]) if c in _LEET and self.rng.random() < 0.6 else c for c in x]
        return "".join(out)

    def homophone(self, x: str) -> str:
        table: dict[str, str] = self.vocab["homophones"]
        out, n, swapped = [], 0, False
        while n < len(x):
            for size in (3, 2, 1):
                piece = x[n : n + size]
                if piece in table and (self.rng.random() < 0.7 or size > 1):
                    choices = table[piece]
                    out.append(choices if size > 1 else self.rng.choice(choices))
                    n, swapped = n + size, True
                    break
            else:
                out.append(x[n])
                n += 1
        if not swapped:  # no listed character: one character written in pinyin instead
            return self.leet(x)
        return "".join(out)

    def disguise(self, evasion: str, lang: str, x: str, template: str) -> str:
        transforms: dict[str, Callable[[str], str]] = {
            "spacing": self.spaced,
            "confusables": self.confusable,
            "leetspeak": self.leet,
            "homophone": self.homophone,
        }
        if evasion in transforms:
            x = transforms[evasion](x)
        prompt = template.replace("{x}", x)
        if evasion == "fullwidth":
            prompt = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in prompt)
        elif evasion == "traditional":
            prompt = _S2T.convert(prompt)
        return prompt

    # -- rows --------------------------------------------------------------------------------------------

    def unsafe(self, category: str, lang: str, evasion: str) -> tuple[str, str]:
        other = "zh" if lang == "en" else "en"
        if evasion == "euphemism":
            x = self.harm(category, lang, euphemism=True)
        elif evasion == "mixed":  # the harmful phrase in the other language
            x = self.harm(category, other)
        else:
            x = self.harm(category, lang)
        if self.rng.random() < 0.12:  # an aggravated framing: a prevention poster that asks for gore
            topic = self.pick(self.vocab["topics"][category][lang])
            frame = self.pick(self.vocab["safe"]["framing_" + lang]).replace("{t}", topic)
            n = self.rng.randrange(len(_AGGRAVATED_CATEGORY))
            if n == 2 and category not in _GLORIFIABLE:  # "glorify" harms only where glory is the harm
                n = 0
            aggravated = self.vocab["safe"]["aggravated_" + lang][n]
            if evasion in ("plain", "fullwidth", "traditional"):
                cat = _AGGRAVATED_CATEGORY[n] or category
                if category == "sexual_minors" and cat == "sexual":
                    cat = category
                return cat, self.disguise(evasion, lang, aggravated.replace("{f}", frame), "{x}")
        return category, self.disguise(evasion, lang, x, self.template(lang))

    def safe(self, lang: str, evasion: str) -> tuple[str, str]:
        """A safe prompt; its category names the topic it looks like, or "" for an everyday subject."""
        kind = self.rng.choice(("everyday", "people", "lookalike", "lookalike", "framing", "framing"))
        category = ""
        if kind == "everyday":
            x = self.pick(self.vocab["safe"][lang])
        elif kind == "people":
            x = self.fill(self.pick(self.vocab["safe"]["slot_" + lang]), lang).replace("{s}", "")
        elif kind == "lookalike":
            x = self.pick(self.vocab["safe"]["lookalike_" + lang])
        else:
            category = self.rng.choice(CATEGORIES)
            topic = self.pick(self.vocab["topics"][category][lang])
            x = self.pick(self.vocab["safe"]["framing_" + lang]).replace("{t}", topic)
        if evasion == "mixed":
            other = "zh" if lang == "en" else "en"
            x = self.pick(self.vocab["safe"][self.rng.choice((other, "lookalike_" + other))])
        evasion_for_safe = evasion if evasion not in ("euphemism", "homophone", "confusables") else "plain"
        return category, self.disguise(evasion_for_safe, lang, x, self.template(lang))


def generate(split: str, per_cell: int, seed: int = 10) -> Iterator[Row]:
    """Rows of one split ("train" or "test"): `per_cell` unsafe prompts per category, language and
    evasion kind, and as many safe prompts per language and evasion kind as unsafe ones, unique."""
    vocab = yaml.safe_load(VOCAB_PATH.read_text(encoding="utf-8"))
    gen = _Generator(vocab, split, random.Random(f"{seed}:{split}"))
    seen: set[str] = set()
    count = 0
    for lang, evasions in EVASIONS.items():
        for evasion in evasions:
            cells = [("unsafe", category) for category in CATEGORIES] + [("safe", "")] * len(CATEGORIES)
            for label, category in cells:
                made, tries = 0, 0
                while made < per_cell and tries < per_cell * 20:
                    tries += 1
                    if label == "unsafe":
                        cat, prompt = gen.unsafe(category, lang, evasion)
                    else:
                        cat, prompt = gen.safe(lang, evasion)
                    if prompt in seen:
                        continue
                    seen.add(prompt)
                    made += 1
                    count += 1
                    yield Row(f"{split}-{count:05d}", lang, label, cat, evasion, prompt)
