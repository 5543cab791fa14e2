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
from dataclasses import field as dataclass_field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml
from confusable_homoglyphs import utils as confusable_data

from stream_processors.gatekeeper.chinese import homophone_regex, pinyin_pattern, pinyin_view, to_simplified
from stream_processors.gatekeeper.prompt_model import DEFAULT_MODEL_PATH, PromptModel

if TYPE_CHECKING:
    from plumbing.settings import GatekeeperSettings

DEFAULT_POLICY_PATH = Path(__file__).parent / "policy.yaml"

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
    reason: str = ""  # reason code within the category (SEXUAL_MINORS, DOXXING, ...)
    model_version: str | None = None  # the prompt model's version when it was consulted
    score: float | None = None  # the deciding (or, when allowed, the highest) model score
    scores: Mapping[str, float] = dataclass_field(
        default_factory=dict
    )  # every category's model score, for audit


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
_LONG_HAN_TERM = re.compile("[\u4e00-\u9fff]{3,}")
_CATEGORY_KEYS = ("terms", "patterns", "homophones", "cues", "reason", "strict")


@dataclass(frozen=True)
class Rules:
    """One category of a policy, its terms already normalised (see the module docstring)."""

    terms: Sequence[str] = ()
    patterns: Sequence[str] = ()
    homophones: Sequence[str] = ()  # Chinese terms also matched by their pinyin
    cues: Sequence[str] = ()  # ambiguous words: block only with the model's agreement
    reason: str = ""  # reason code on the verdict; default: the category name in upper case
    strict: bool = False  # a prevention/news/medical framing never excuses a match


@dataclass(frozen=True)
class Inspection:
    """What the policy found in one text: a rule it breaks, a cue it holds, whether it is framed as
    prevention, news, history, medicine or education (without asking for gore, sex or glorification),
    and the text the model reads (the collapsed view and its pinyin)."""

    hit: tuple[str, str] | None
    cue: tuple[str, str] | None
    framed: bool
    model_text: str


class Policy:
    """A parsed, compiled policy: immutable once built, safe to share between threads."""

    def __init__(
        self,
        version: str,
        categories: Mapping[str, Rules | tuple[Sequence[str], Sequence[str]]],
        allow: Sequence[str],
        framing: Sequence[str] = (),
        aggravating: Sequence[str] = (),
    ) -> None:
        """Compile normalised rules; build a policy with `from_mapping` or `from_file`, which normalise."""
        self.version = version
        self.rules = {
            name: rules if isinstance(rules, Rules) else Rules(*rules) for name, rules in categories.items()
        }
        self.categories = tuple(self.rules)
        indexed = list(enumerate(self.rules.items()))
        self._terms, self._term_labels = _trie(
            (term, (index, name, term)) for index, (name, rule) in indexed for term in rule.terms
        )
        # One regex per pattern: each keeps the fast literal-prefix search an alternation would lose.
        labels = [(index, name, pattern) for index, (name, rule) in indexed for pattern in rule.patterns]
        self._patterns = [(re.compile(label[2]), label) for label in labels]
        self._cues, self._cue_labels = _trie(
            (cue, (index, name, cue)) for index, (name, rule) in indexed for cue in rule.cues
        )
        # Pinyin rules, searched in the pinyin view: the homophone terms, every Chinese term of three
        # or more characters (rare enough as sounds), and the Chinese word-group patterns.
        self._homophones: list[tuple[re.Pattern[str], str]] = []
        for name, rule in self.rules.items():
            long_terms = [term for term in rule.terms if _LONG_HAN_TERM.fullmatch(term)]
            regex = homophone_regex([*rule.homophones, *long_terms])
            if regex is not None:
                self._homophones.append((regex, name))
            for pattern in rule.patterns:
                if (spelled := pinyin_pattern(pattern)) is not None:
                    self._homophones.append((re.compile(spelled), name))
        self._allow = _trie((phrase, None) for phrase in allow)[0]
        self._framing = _trie((phrase, None) for phrase in framing)[0]
        self._aggravating = _trie((phrase, None) for phrase in aggravating)[0]

    def reason(self, category: str) -> str:
        """The reason code a block in `category` carries."""
        rules = self.rules.get(category)
        return (rules.reason if rules is not None else "") or category.upper()

    def strict(self, category: str) -> bool:
        rules = self.rules.get(category)
        return rules is not None and rules.strict

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Policy:
        """Validate and compile a policy; a malformed one raises ValueError naming the offending key."""
        if not isinstance(data, Mapping):
            raise ValueError("policy: the top level must be a mapping")
        known = ("version", "categories", "allow", "context")
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise ValueError(f"policy key {unknown[0]!r}: unknown (expected {', '.join(known)})")
        version = data.get("version")
        if not isinstance(version, str) or not version.strip():
            raise ValueError("policy key 'version': must be a non-empty string (quote dates in YAML)")
        raw_categories = data.get("categories")
        if not isinstance(raw_categories, Mapping) or not raw_categories:
            raise ValueError("policy key 'categories': must be a non-empty mapping of name to terms/patterns")
        categories: dict[str, Rules] = {}
        for name, body in raw_categories.items():
            where = f"categories.{name}"
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"policy key {where!r}: a category name must be a non-empty string")
            if not isinstance(body, Mapping):
                raise ValueError(f"policy key {where!r}: must be a mapping with terms and/or patterns")
            extra = sorted(str(key) for key in body if key not in _CATEGORY_KEYS)
            if extra:
                expected = ", ".join(_CATEGORY_KEYS)
                raise ValueError(f"policy key '{where}.{extra[0]}': unknown (expected {expected})")
            terms = _terms(body.get("terms"), f"{where}.terms")
            patterns = _patterns(body.get("patterns"), f"{where}.patterns")
            homophones = _strings(body.get("homophones"), f"{where}.homophones")
            if not terms and not patterns and not homophones:
                raise ValueError(f"policy key {where!r}: needs at least one term or pattern")
            reason, strict = body.get("reason", ""), body.get("strict", False)
            if not isinstance(reason, str) or not isinstance(strict, bool):
                raise ValueError(f"policy key {where!r}: reason must be a string and strict true or false")
            cues = _terms(body.get("cues"), f"{where}.cues")
            categories[name] = Rules(terms, patterns, homophones, cues, reason, strict)
        context = data.get("context") or {}
        if not isinstance(context, Mapping) or set(context) - {"framing", "aggravating"}:
            raise ValueError("policy key 'context': must be a mapping with framing and/or aggravating")
        return cls(
            version,
            categories,
            _terms(data.get("allow"), "allow"),
            _terms(context.get("framing"), "context.framing"),
            _terms(context.get("aggravating"), "context.aggravating"),
        )

    @classmethod
    def from_file(cls, path: Path) -> Policy:
        """Read and compile a YAML policy; ValueError names the file and the offending key."""
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
        return self.inspect(text).hit

    def inspect(self, text: str) -> Inspection:
        """Every view of `text` searched once: the first rule broken, the first cue, the framing."""
        plain, word, collapsed = _views(text)
        hit: tuple[str, str] | None = None
        for view in (plain, word if word != plain else "", collapsed if collapsed != word else ""):
            found = self._first(self._unallowed(view)) if view else None
            if found is not None:
                hit = found[1], found[2]
                break
        pinyin = pinyin_view(self._unallowed(collapsed))
        if hit is None:
            for regex, category in self._homophones:
                if (homophone := regex.search(pinyin)) is not None:
                    hit = category, f"pinyin:{homophone.group()}"
                    break
        cue = None
        if self._cues is not None and (found_cue := self._cues.search(collapsed)) is not None:
            label = self._cue_labels[(found_cue.lastindex or 0) - 2]
            cue = label[1], label[2]
        framed = (
            self._framing is not None
            and self._framing.search(word) is not None
            and (self._aggravating is None or self._aggravating.search(self._unallowed(collapsed)) is None)
        )
        model_text = collapsed.strip() if pinyin == collapsed else f"{collapsed.strip()} | {pinyin.strip()}"
        return Inspection(hit, cue, framed, model_text)

    def _unallowed(self, view: str) -> str:
        """`view` with allow-listed phrases blanked out."""
        if self._allow is None or self._allow.search(view) is None:
            return view
        return self._allow.sub(r"\1 ", view)

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
    """Checks a request's texts against a policy and the prompt model, then against any classifiers.

    Per text: a rule of the policy (term, pattern, Chinese homophone) blocks, unless the text is framed
    as prevention, news, history, medicine or education and its category is not strict; then the model
    decides. A cue (an ambiguous word: "naked", "shoot") blocks when the model's score for its category
    reaches `cue_thresholds`; with no rule or cue, a score reaching `thresholds` blocks.
    """

    def __init__(
        self,
        policy: Policy,
        classifiers: Sequence[Classifier] = (),
        threshold: float = 0.5,
        model: PromptModel | None = None,
        thresholds: Mapping[str, float] | None = None,
        cue_thresholds: Mapping[str, float] | None = None,
    ) -> None:
        for value in (threshold, *(thresholds or {}).values(), *(cue_thresholds or {}).values()):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"threshold {value!r}: must be between 0 and 1")
        self.policy = policy
        self.classifiers = tuple(classifiers)
        self.threshold = threshold
        self.model = model
        self.thresholds = dict(thresholds or {})
        self.cue_thresholds = dict(cue_thresholds or {})

    def check(self, texts: Mapping[str, str | None]) -> Verdict:
        """Policy and model over every field in order, then classifiers (slower) over every field."""
        present = [(name, text) for name, text in texts.items() if text]
        version = self.policy.version
        top: tuple[float, Mapping[str, float]] = (0.0, {})
        for name, text in present:
            verdict = self._check_text(name, text)
            if not verdict.allowed:
                return verdict
            if verdict.score is not None and verdict.score >= top[0]:
                top = (verdict.score, verdict.scores)
        for name, text in present:
            for classifier in self.classifiers:
                result = classifier.classify(text)
                if result is not None and result[1] >= self.threshold:
                    return Verdict(
                        False, version, result[0], classifier.name, name, reason=self.policy.reason(result[0])
                    )
        if self.model is None:
            return Verdict(True, version)
        return Verdict(True, version, model_version=self.model.version, score=top[0], scores=top[1])

    def _check_text(self, name: str, text: str) -> Verdict:
        found = self.policy.inspect(text)
        version, model = self.policy.version, self.model
        if found.hit is not None and (model is None or self.policy.strict(found.hit[0]) or not found.framed):
            category, matched = found.hit
            return Verdict(False, version, category, "policy", name, matched, self.policy.reason(category))
        if model is None:
            return Verdict(True, version)
        scores = model.scores(found.model_text)
        blocking = [
            (score - self._threshold(category, found), category)
            for category, score in scores.items()
            if score >= self._threshold(category, found)
        ]
        if blocking:
            category = max(blocking)[1]
            return Verdict(
                False,
                version,
                category,
                model.name,
                name,
                found.cue[1] if found.cue and found.cue[0] == category else None,
                self.policy.reason(category),
                model.version,
                scores[category],
                scores,
            )
        return Verdict(True, version, model_version=model.version, score=max(scores.values()), scores=scores)

    def _threshold(self, category: str, found: Inspection) -> float:
        """A category's model threshold for this text: the lower cue threshold where a cue of it is
        present and the text is not framed (a framed match is judged like any other text)."""
        if found.cue is not None and found.cue[0] == category and not found.framed:
            return self.cue_thresholds.get(category, self.thresholds.get(category, self.threshold))
        return self.thresholds.get(category, self.threshold)


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


def build_moderator(conf: GatekeeperSettings) -> Moderator:
    """The Moderator the gatekeeper uses, from its settings: policy, prompt model, thresholds and any
    extra classifiers. `aigc moderation eval` builds it the same way, so it scores what runs."""
    policy = Policy.from_file(conf.policy_path or DEFAULT_POLICY_PATH)
    model = (
        PromptModel.load(conf.prompt_model_path or DEFAULT_MODEL_PATH) if conf.prompt_model_enabled else None
    )
    return Moderator(
        policy,
        [load_classifier(spec) for spec in conf.classifiers],
        conf.classifier_threshold,
        model,
        conf.moderation_thresholds,
        conf.moderation_cue_thresholds,
    )
