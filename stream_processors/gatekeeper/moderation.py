r"""Prompt moderation: decide, before any GPU time is spent, whether a request's texts may be rendered.

Consumes a request's texts as field name -> text (``prompt``, ``negative_prompt``, ``video.prompt_end``;
None or empty is skipped) and produces a `Verdict`: allowed, or blocked with the category, the source
(``policy`` or a classifier's name), the field and the policy version. Pure logic, no I/O but the policy.

Policy file (YAML; the shipped ``policy.yaml`` documents it at length)::

    version: "2026-11-01"          # any string (quote dates); carried on every verdict
    categories:                    # name -> terms and/or patterns
      violence: {terms: [gore, 血腥, 斩首, 斬首], patterns: ['dismember\w*']}
    allow: [al gore, 血腥玛丽]      # optional: phrases that never trigger (Scunthorpe-style false hits)

A term (a word or phrase, normalised like the text) matches unless a Latin letter or digit touches it:
"kill" misses "skill", while Chinese terms match as substrings. A space in a term matches any run of
separators. Patterns are regexes searched in each lower-case, space-padded view below (upper case,
backreferences, named groups and matching "" are refused). Allow phrases follow the term rules and are
blanked out before a view is searched again. The leftmost match wins; at one position the category
listed first, then a pattern before a term.

Normalisation builds up to three views of a text (terms go through the first):

1. *plain*: per character NFKC (full-width and compatibility forms) and casefold; outside CJK, format
   and control characters (zero-width, soft hyphen, BOM) and marks dropped (é→e) and look-alike
   letters mapped to Latin (`_LOOKALIKES`); CJK keeps its marks; a space where CJK meets Latin; runs
   of 3+ equal characters cut to two.
2. *word* (what `normalise` returns): leetspeak undone in tokens with a Latin letter and no 2 or 6, so
   "1024x768" stays: 0→o 1→i 3→e 4→a 5→s 7→t 8→b 9→g, and before a letter @→a $→s !→i |→l +→t.
3. *collapsed*: the word view with runs of lone characters joined ("k.i.l.l", "s e x") and separators
   between CJK characters removed ("血 . 腥"); only lone characters are joined, never whole words.

Terms match tolerantly in every view: a letter matches one or two of it ("goore" is "gore"), a double
letter exactly two, and "i" and "l" match each other, so "k1ll" and "ki11" both match "kill" without a
second leet view for "1" read as "l" (the price: "kiil" matches too). A view equal to the one before it
is not searched again.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Protocol

import yaml

DEFAULT_POLICY_PATH = Path(__file__).parent / "policy.yaml"

# Scripts written without spaces, whose marks carry meaning (kana voicing) and which are left unfolded.
_CJK = (
    "\u1100-\u11ff\u2e80-\u2fdf\u3005-\u3007\u3021-\u3029\u3040-\u30ff\u3100-\u312f\u3131-\u318f"
    "\u31a0-\u31bf\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
)
_CJK_CHAR = re.compile(f"[{_CJK}]")
# Look-alike letters NFKC leaves alone, each with its Latin twin (lower case: the text is casefolded
# first): Cyrillic, Greek, then Latin letters with no decomposition. RUF001 is silenced because
# ambiguity is the whole point of this table.
_LOOKALIKES = (
    *("аa", "вb", "еe", "єe", "ѕs", "іi", "јj", "кk", "мm", "нh", "оo", "рp", "сc", "ԁd", "тt"),  # noqa: RUF001
    *("уy", "хx", "һh", "ԛq", "ԝw", "үy", "ӏl"),  # noqa: RUF001
    *("αa", "βb", "εe", "ηn", "ιi", "κk", "νv", "οo", "ρp", "τt", "υu", "χx", "ωw", "ϲc", "ϳj"),  # noqa: RUF001
    *("ɡg", "ɑa", "ıi", "ɩi", "łl", "øo", "đd", "ħh"),  # noqa: RUF001
)
_CONFUSABLES = {pair[0]: pair[1] for pair in _LOOKALIKES} | {"æ": "ae", "œ": "oe"}
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
_SEP_ATOM = r"[\W_]+"
_PATTERN_FORBIDDEN = re.compile(r"\\[1-9]|\\g<|\(\?P[<=]")
_ESCAPE = re.compile(r"\\.")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What moderation decided; on a block, which rule (category, source) fired on which field."""

    allowed: bool
    policy_version: str
    category: str | None = None
    source: str = "policy"
    field: str | None = None
    matched: str | None = None  # the term or pattern, for operator logs only: never shown to users


class Classifier(Protocol):
    """A model or service consulted after the policy passes; it sees the original, unnormalised text."""

    name: str

    def classify(self, text: str) -> tuple[str, float] | None: ...


def _fold(text: str) -> str:
    if text.isascii():  # the common case: NFKC and the fold table would change nothing but controls
        lowered = text.lower()
        return _ASCII_INVISIBLE.sub("", lowered) if _ASCII_INVISIBLE.search(lowered) else lowered
    folded = text.translate(_FOLD)
    if not unicodedata.is_normalized("NFC", folded):  # kana voicing marks, Hangul jamo: compose them
        folded = unicodedata.normalize("NFC", folded)
    return folded if folded.isascii() else _space_cjk(folded)


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
    dominant = max(set(seps), key=seps.count)
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


# One step of a term: the letters it stands for and a count (0: a run of separators; 1: one letter or
# two of it; 2: exactly two, a double letter, as runs in the text are cut to two).
_Atom = tuple[str, int]
_END: _Atom = ("", -1)


def _atoms(term: str) -> list[_Atom]:
    atoms: list[_Atom] = []
    for n, word in enumerate(term.split(" ")):
        if n:
            atoms.append(("", 0))
        for char, run in groupby(word):
            atoms.append(("il" if char in "il" else char, 2 if len(list(run)) > 1 else 1))
    return atoms


def _atom_regex(atom: _Atom) -> str:
    letters, count = atom
    if count == 0:
        return _SEP_ATOM
    one = re.escape(letters) if len(letters) == 1 else f"[{letters}]"
    # Spelled out ("gg?", not "g{1,2}"): a branch that starts with a plain letter or set is ruled out by
    # `re` with one comparison, while a repeat has to be entered first.
    return one + one if count == 2 else f"{one}{one}?"


def _trie(entries: Iterable[tuple[str, Any]]) -> tuple[re.Pattern[str] | None, list[Any]]:
    """One regex for many terms, and the labels of its empty end-of-term groups in group order.

    It starts by consuming the separator before a term, which lets `re` skip ahead in C past every
    position inside a word (a leading lookbehind or ``\\b`` would be tried at each). The terms form a
    trie, so one look at a character rules out most, and `lastindex` names the term that matched."""
    root: dict[_Atom, Any] = {}
    for term, label in entries:
        node = root
        for atom in _atoms(term):
            node = node.setdefault(atom, {})
        node.setdefault(_END, label)
    labels: list[Any] = []

    def emit(node: dict[_Atom, Any]) -> str:
        branches = [_atom_regex(atom) + emit(child) for atom, child in node.items() if atom != _END]
        if _END in node:
            labels.append(node[_END])
            branches.append("(?![a-z0-9])()")
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"

    return (re.compile(f"([^a-z0-9]){emit(root)}") if root else None), labels


_Label = tuple[int, str, str]  # category index, category, term or pattern
_Rules = tuple[Sequence[str], Sequence[str]]  # a category's terms and patterns


class Policy:
    """A parsed, compiled policy: immutable once built, safe to share between threads."""

    def __init__(self, version: str, categories: Mapping[str, _Rules], allow: Sequence[str]) -> None:
        """Compile normalised rules; build a policy with `from_mapping` or `from_file`, which normalise."""
        self.version = version
        self.categories = tuple(categories)
        rules = [(index, category, *rule) for index, (category, rule) in enumerate(categories.items())]
        self._terms, self._term_labels = _trie(
            (term, (index, category, term)) for index, category, terms, _ in rules for term in terms
        )
        # One regex per pattern: each keeps the fast literal-prefix search an alternation would lose.
        labels = [
            (index, category, pattern) for index, category, _, patterns in rules for pattern in patterns
        ]
        self._patterns = [(re.compile(label[2]), label) for label in labels]
        self._allow = _trie((phrase, None) for phrase in allow)[0]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Policy:
        """Validate and compile a policy; a malformed one raises ValueError naming the offending key."""
        if not isinstance(data, Mapping):
            raise ValueError("policy: the top level must be a mapping")
        unknown = sorted(str(key) for key in data if key not in ("version", "categories", "allow"))
        if unknown:
            raise ValueError(f"policy key {unknown[0]!r}: unknown (expected version, categories, allow)")
        version = data.get("version")
        if not isinstance(version, str) or not version.strip():
            raise ValueError("policy key 'version': must be a non-empty string (quote dates in YAML)")
        raw_categories = data.get("categories")
        if not isinstance(raw_categories, Mapping) or not raw_categories:
            raise ValueError("policy key 'categories': must be a non-empty mapping of name to terms/patterns")
        categories: dict[str, _Rules] = {}
        for name, body in raw_categories.items():
            where = f"categories.{name}"
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"policy key {where!r}: a category name must be a non-empty string")
            if not isinstance(body, Mapping):
                raise ValueError(f"policy key {where!r}: must be a mapping with terms and/or patterns")
            extra = sorted(str(key) for key in body if key not in ("terms", "patterns"))
            if extra:
                raise ValueError(f"policy key '{where}.{extra[0]}': unknown (expected terms, patterns)")
            terms = _terms(body.get("terms"), f"{where}.terms")
            patterns = _patterns(body.get("patterns"), f"{where}.patterns")
            if not terms and not patterns:
                raise ValueError(f"policy key {where!r}: needs at least one term or pattern")
            categories[name] = (terms, patterns)
        return cls(version, categories, _terms(data.get("allow"), "allow"))

    @classmethod
    def from_file(cls, path: Path) -> Policy:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"policy file {path}: not valid YAML: {exc}") from exc
        try:
            return cls.from_mapping(data)
        except ValueError as exc:
            raise ValueError(f"policy file {path}: {exc}") from exc

    def match(self, text: str) -> tuple[str, str] | None:
        """(category, term or pattern) of the first rule `text` breaks, or None."""
        plain, word, collapsed = _views(text)
        for view in (plain, word if word != plain else "", collapsed if collapsed != word else ""):
            hit = self._first(view) if view else None
            if hit is not None and self._allow is not None and self._allow.search(view) is not None:
                hit = self._first(self._allow.sub(r"\1 ", view))
            if hit is not None:
                return hit[1], hit[2]
        return None

    def _first(self, view: str) -> _Label | None:
        """The leftmost rule `view` breaks; at one position the earlier category, then patterns, win."""
        best: tuple[int, int, int, _Label] | None = None
        if self._terms is not None and (found := self._terms.search(view)) is not None:
            label = self._term_labels[(found.lastindex or 0) - 2]  # group 1 is the separator before
            best = (found.start() + 1, label[0], 1, label)
        for regex, label in self._patterns:
            found = regex.search(view)
            if found is not None and (best is None or (found.start(), label[0], 0, label) < best):
                best = (found.start(), label[0], 0, label)
        return None if best is None else best[3]


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        value = []
    if not isinstance(value, list | tuple):
        raise ValueError(f"policy key {where!r}: must be a list of strings")
    for n, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"policy key '{where}[{n}]': must be a non-empty string, got {item!r}")
    return list(value)


def _terms(value: Any, where: str) -> list[str]:
    """Terms (or allow phrases) in the form the text takes in the plain view."""
    terms = []
    for n, raw in enumerate(_strings(value, where)):
        term = _REPEAT.sub(r"\1\1", " ".join(_fold(raw).split()))
        if not term:
            raise ValueError(f"policy key '{where}[{n}]': {raw!r} is empty once normalised")
        terms.append(term)
    return terms


def _patterns(value: Any, where: str) -> list[str]:
    patterns = _strings(value, where)
    for n, pattern in enumerate(patterns):
        key = f"policy key '{where}[{n}]'"
        if _PATTERN_FORBIDDEN.search(pattern):
            raise ValueError(f"{key}: backreferences and named groups are not supported")
        literal = _ESCAPE.sub("", pattern)
        if literal != literal.lower():
            raise ValueError(f"{key}: {pattern!r} has upper-case letters but the text it sees is lower case")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{key}: invalid regular expression {pattern!r}: {exc}") from exc
        if compiled.fullmatch("") is not None:
            raise ValueError(f"{key}: {pattern!r} matches the empty string")
    return patterns


class Moderator:
    """Checks a request's texts against a policy, then against any classifiers."""

    def __init__(
        self, policy: Policy, classifiers: Sequence[Classifier] = (), threshold: float = 0.5
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold {threshold!r}: must be between 0 and 1")
        self.policy = policy
        self.classifiers = tuple(classifiers)
        self.threshold = threshold

    def check(self, texts: Mapping[str, str | None]) -> Verdict:
        """Policy over every field in order, then classifiers (slower) over every field in order."""
        present = [(field, text) for field, text in texts.items() if text]
        version = self.policy.version
        for field, text in present:
            hit = self.policy.match(text)
            if hit is not None:
                return Verdict(False, version, hit[0], "policy", field, hit[1])
        for field, text in present:
            for classifier in self.classifiers:
                result = classifier.classify(text)
                if result is not None and result[1] >= self.threshold:
                    return Verdict(False, version, result[0], classifier.name, field)
        return Verdict(True, version)


def load_classifier(spec: str) -> Classifier:
    """Import ``package.module:ClassName`` and instantiate it with no arguments."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"classifier {spec!r}: expected 'package.module:ClassName'")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"classifier {spec!r}: cannot be imported: {exc}") from exc
    instance = factory()
    if not isinstance(getattr(instance, "name", None), str) or not hasattr(instance, "classify"):
        raise TypeError(f"classifier {spec!r}: needs a str `name` and a `classify(text)` method")
    return instance
