"""Chinese text for moderation: traditional to simplified (OpenCC) and a pinyin view for homophones.

Consumes normalised text (already folded by `moderation`); produces the simplified text and the *pinyin
view*: every Han character replaced by its toneless pinyin syllable (pypinyin), separated by spaces, with
Latin words kept. Matching a term's syllables in that view catches a term written with homophones
(涩情 and 色请 for 色情) or partly in pinyin (色qing, seqing). Both converters are built once; a
character's syllable is cached on first sight, so a prompt costs a few dictionary look-ups per character.
"""

from __future__ import annotations

import re
from functools import lru_cache

import opencc
from pypinyin import Style, lazy_pinyin

_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_T2S = opencc.OpenCC("t2s")
_SPACES = re.compile(r"\s+")


def has_han(text: str) -> bool:
    """Whether `text` has a Han (Chinese) character."""
    return _HAN.search(text) is not None


def to_simplified(text: str) -> str:
    """Traditional characters (and phrases: 頭髮 -> 头发) converted to simplified by OpenCC's t2s."""
    return _T2S.convert(text) if has_han(text) else text


@lru_cache(maxsize=1 << 16)
def _syllable(char: str) -> str:
    return lazy_pinyin(char, style=Style.NORMAL)[0]


def pinyin_view(text: str) -> str:
    """`text` with each Han character replaced by `" syllable "`; other characters unchanged, runs of
    white space cut to one. Characters are read one by one (no phrase context): a homophone is what is
    wanted here, and the most common reading of each character is the one evaders write."""
    if not has_han(text):
        return text
    out = [f" {_syllable(char)} " if _HAN.match(char) else char for char in text]
    return _SPACES.sub(" ", "".join(out))


def term_syllables(term: str) -> list[str]:
    """The toneless syllables of a Chinese term, as `pinyin_view` would write them."""
    return pinyin_view(to_simplified(term)).split()


def homophone_regex(terms: list[str]) -> re.Pattern[str] | None:
    """One regex over a pinyin view for all `terms`: a term's syllables in order, each run of separators
    between them optional ("se qing", "seqing", "se-qing"), and no Latin letter touching either end."""
    alternatives = sorted(
        {r"[\W_]*".join(map(re.escape, syllables)) for syllables in map(term_syllables, terms) if syllables},
        key=len,
        reverse=True,
    )
    if not alternatives:
        return None
    return re.compile(f"(?<![a-z])(?:{'|'.join(alternatives)})(?![a-z])")


_GROUP_OR_GAP = re.compile(r"\(\?:([^()]*)\)|\.\{0,(\d+)\}\?")
_ALL_HAN = re.compile("[\u4e00-\u9fff]{2,}")


def pinyin_pattern(pattern: str) -> str | None:
    """A pattern of Chinese word groups and gaps, ``(?:儿童|幼女).{0,20}?(?:色情|裸体)``, rewritten for
    the pinyin view: each word of two or more characters as its syllables (separators optional), a gap
    four times as long. Single characters and mixed words are left out (one syllable has too many
    homophones); a pattern of any other shape has no pinyin form (None)."""
    parts, end = [], 0
    for found in _GROUP_OR_GAP.finditer(pattern):
        if found.start() != end:
            return None
        end = found.end()
        if found.group(2) is not None:
            parts.append(f".{{0,{4 * int(found.group(2))}}}?")
            continue
        words = [w for w in found.group(1).split("|") if _ALL_HAN.fullmatch(w)]
        if not words:
            return None
        spelled = sorted({r"[\W_]*".join(term_syllables(w)) for w in words}, key=len, reverse=True)
        parts.append(f"(?<![a-z])(?:{'|'.join(spelled)})(?![a-z])")
    return "".join(parts) if parts and end == len(pattern) else None
