r"""Text normalisation for prompt moderation: the views of a text that policy terms are searched in.

Consumes any text; produces up to three views of it, each lower case and padded with a space:

1. *plain*: per character NFKC (full-width and compatibility forms) and casefold; outside CJK, format
   and control characters (zero-width, soft hyphen, BOM) and marks dropped (é→e) and look-alike
   letters mapped to Latin (Unicode TR39 confusables, from `confusable_homoglyphs`); CJK keeps its
   marks; traditional Chinese converted to simplified (OpenCC t2s, `chinese.to_simplified`); a space
   where CJK meets Latin; runs of 3+ equal characters cut to two.
2. *word* (what `normalise` returns): leetspeak undone in tokens with a Latin letter and no 2 or 6, so
   "1024x768" stays: 0→o 1→i 3→e 4→a 5→s 7→t 8→b 9→g, and before a letter @→a $→s !→i |→l +→t.
3. *collapsed*: the word view with runs of lone characters joined ("k.i.l.l", "s e x") and separators
   between CJK characters removed ("血 . 腥"); only lone characters are joined, never whole words.

Folding is cached per code point, so a text costs one `str.translate` pass plus a few regex passes.
"""

from __future__ import annotations

import re
import unicodedata

from confusable_homoglyphs import utils as confusable_data

from stream_processors.gatekeeper.chinese import to_simplified

# Scripts written without spaces, whose marks carry meaning (kana voicing) and which are left unfolded.
_CJK = (
    "\u1100-\u11ff\u2e80-\u2fdf\u3005-\u3007\u3021-\u3029\u3040-\u30ff\u3100-\u312f\u3131-\u318f"
    "\u31a0-\u31bf\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
)
_CJK_CHAR = re.compile(f"[{_CJK}]")
# Look-alike letters: Unicode TR39 confusables (the `confusable_homoglyphs` data) whose skeleton is one
# ASCII letter or digit, then a few Latin letters with strokes that TR39 does not list and NFKD keeps.
_STROKED = {
    "є": "e",
    "ł": "l",
    "ø": "o",
    "đ": "d",
    "ħ": "h",
    "ɨ": "i",
    "ŧ": "t",
    "ƀ": "b",
    "æ": "ae",
    "œ": "oe",
}


def _tr39_latin() -> dict[str, str]:
    table: dict[str, str] = {}
    for char, glyphs in confusable_data.load("confusables.json").items():
        if char.isascii() or _CJK_CHAR.match(char):
            continue
        latin = next(
            (g["c"] for g in glyphs if len(g["c"]) == 1 and g["c"].isascii() and g["c"].isalnum()), None
        )
        if latin is not None:
            table[char] = latin.lower()
            # The text is casefolded before this table is read: Cyrillic capitals (TR39: H, M, T, b)
            # arrive in lower case, which TR39 lists with nothing or with another letter.
            if not char.casefold().isascii():  # long s casefolds to s, and TR39 reads it as f
                table.setdefault(char.casefold(), latin.lower())
    return table


_CONFUSABLES = _tr39_latin() | _STROKED
_LEET_DIGITS = str.maketrans("01345789", "oieastbg")
_LEET_SYMBOLS = {"@": "a", "$": "s", "!": "i", "|": "l", "+": "t"}
_FOLD_CACHE_LIMIT = 1 << 16


def _invisible(char: str) -> bool:
    category = unicodedata.category(char)
    return category == "Cf" or category[0] == "M" or (category == "Cc" and not char.isspace())


def _fold_char(char: str) -> str:
    """NFKC and casefold; then, outside CJK, invisible characters and marks dropped, look-alikes mapped."""
    out: list[str] = []
    for c in unicodedata.normalize("NFKC", char).casefold():
        if _CJK_CHAR.match(c):
            out.append(c)
        elif not _invisible(c):  # zero-width characters, soft hyphens, stray marks, controls go
            bare = (b for b in unicodedata.normalize("NFKD", c) if unicodedata.category(b)[0] != "M")
            out.extend(_CONFUSABLES.get(b, b) for b in bare)
    return "".join(out)


class _FoldTable(dict[int, int | str | None]):
    """A `str.translate` table of `_fold_char`, filled on first sight of each code point: folding a text
    is then one pass in C (a whole-text NFKC is several times slower on Chinese full-width punctuation)."""

    def __missing__(self, code: int) -> int | str | None:
        folded = _fold_char(chr(code))
        value: int | str | None = code if folded == chr(code) else folded or None
        if len(self) < _FOLD_CACHE_LIMIT:  # bounded: a hostile prompt may walk the whole of Unicode
            self[code] = value
        return value


_FOLD = _FoldTable()
_ASCII_INVISIBLE = re.compile(f"[{re.escape(''.join(filter(_invisible, map(chr, range(128)))))}]")
# Each starts with a character set, so `re` skips ahead in C (a leading lookbehind would be tried at every
# position): a CJK character next to a Latin letter or digit, and separators between CJK characters.
_CJK_THEN_LATIN = re.compile(f"([{_CJK}])(?=[a-z0-9])")
_LATIN_THEN_CJK = re.compile(f"([a-z0-9])(?=[{_CJK}])")
_CJK_GAP = re.compile(f"[\\W_](?<=[{_CJK}][\\W_])[\\W_]*(?=[{_CJK}])")
_ASCII_ALNUM = re.compile("[a-z0-9]")
_REPEAT = re.compile(r"(.)\1\1+", re.DOTALL)
_SEPS = re.compile(r"[\W_]+")
# Two or more lone characters with separators between them ("k.i.l.l", "s e x") in a padded view; group 1
# is the separator before the run. ASCII classes are much faster in `re` than Unicode ones.
_SINGLES_ASCII = re.compile(r"([^a-z0-9])([a-z0-9][^a-z0-9]+[a-z0-9](?:[^a-z0-9]+[a-z0-9])*)(?=[^a-z0-9])")
_SINGLES = re.compile(r"([\W_])([^\W_][\W_]+[^\W_](?:[\W_]+[^\W_])*)(?=[\W_])")
# From a token's first leet character to its end; a token is a run of Latin letters, digits and leet
# symbols, and what comes before the match in it is letters, 2 and 6 (see `_deleet_token`).
_LEET_TAIL = re.compile(r"[013457-9@$!|+][a-z0-9@$!|+]*")
_LEET_HEAD = frozenset("abcdefghijklmnopqrstuvwxyz26")
_LETTER = re.compile("[a-z]")
_SYMBOL = re.compile(r"[@$!|+]")


def _fold(text: str) -> str:
    if text.isascii():  # the common case: NFKC and the fold table would change nothing but controls
        lowered = text.lower()
        return _ASCII_INVISIBLE.sub("", lowered) if _ASCII_INVISIBLE.search(lowered) else lowered
    folded = text.translate(_FOLD)
    if not unicodedata.is_normalized("NFC", folded):  # kana voicing marks, Hangul jamo: compose them
        folded = unicodedata.normalize("NFC", folded)
    return folded if folded.isascii() else _space_cjk(to_simplified(folded))


def _space_cjk(text: str) -> str:
    """A space where CJK meets a Latin letter or digit, so "生成gore图片" has the word "gore" in it."""
    if not _CJK_CHAR.search(text) or not _ASCII_ALNUM.search(text):
        return text
    return _LATIN_THEN_CJK.sub(r"\1 ", _CJK_THEN_LATIN.sub(r"\1 ", text))


def _deleet_token(match: re.Match[str]) -> str:
    text, start, tail = match.string, match.start(), match.group()
    head = start
    while head and text[head - 1] in _LEET_HEAD:
        head -= 1
    token = text[head:start] + tail
    if "2" in token or "6" in token or not _LETTER.search(token):
        return tail  # a number ("1024x768", "2k") or no letter at all: not a word in disguise
    if not _SYMBOL.search(tail):
        return tail.translate(_LEET_DIGITS)
    chars = list(tail.translate(_LEET_DIGITS))
    for i, char in enumerate(tail):
        # A symbol stands for a letter only before a letter or digit: "kill!" and "c++" keep theirs.
        if char in _LEET_SYMBOLS and i + 1 < len(tail) and tail[i + 1].isalnum():
            chars[i] = _LEET_SYMBOLS[char]
    return "".join(chars)


def _join_singles(match: re.Match[str]) -> str:
    """Join a run of lone characters into the word it spells.

    Where the separator style changes ("a g.o.r.e": a space, then dots) the characters on either side
    belong to different words, so that separator is kept as a space. A run that starts with the
    one-letter words "a" or "i" ("a k i l l") is also offered without it ("akill kill").
    """
    run = match.group(2)
    chars = _SEPS.split(run)
    seps = _SEPS.findall(run)
    dominant = max(seps, key=seps.count)  # ties: the first separator (a set would vary with the hash seed)
    joined = chars[0] + "".join(
        ("" if sep == dominant else " ") + char for sep, char in zip(seps, chars[1:], strict=True)
    )
    if chars[0] in ("a", "i") and len(chars) > 3 and seps[0] == dominant:
        joined += " " + "".join(chars[1:])
    return match.group(1) + joined


def _views(text: str) -> tuple[str, str, str]:
    """The plain, word and collapsed views of `text` (see the module docstring), each padded with a space
    at both ends so that every word, the first included, has a separator before it."""
    folded = _fold(text)
    if _REPEAT.search(folded):
        folded = _REPEAT.sub(r"\1\1", folded)
    plain = f" {folded} "
    word = _LEET_TAIL.sub(_deleet_token, plain)
    if plain.isascii():
        joined = _SINGLES_ASCII.sub(_join_singles, plain)
    else:
        joined = _space_cjk(_CJK_GAP.sub("", _SINGLES.sub(_join_singles, plain)))
    collapsed = word if joined == plain else _LEET_TAIL.sub(_deleet_token, joined)
    return plain, word, collapsed


def normalise(text: str) -> str:
    """The word view of `text`: folded, look-alikes mapped, long repeats cut to two, leetspeak undone."""
    return _views(text)[1][1:-1]
