r"""The moderation policy: categories of terms, patterns, Chinese homophones and cues, compiled once.

Consumes a policy mapping (YAML; the shipped ``policy.yaml`` documents every key) and, per text, produces
an `Inspection`: the first rule the text breaks, the first cue it holds, whether it is framed as
prevention, news, history, medicine or education, and the text the prompt model reads.

    version: "2026-12-06"          # any string (quote dates); carried on every verdict
    categories:                    # name -> rules
      violence_gore: {reason: VIOLENCE_GORE, terms: [gore, 血腥], patterns: ['dismember\w*'],
                      homophones: [斩首], cues: [blood]}
    context: {framing: [prevention, 新闻], aggravating: [gore, 血腥]}
    allow: [al gore, 血腥玛丽]      # optional: phrases blanked out before matching

A term (a word or phrase, normalised like the text, see `normalisation`) matches unless a Latin letter
or digit touches it: "kill" misses "skill", while Chinese terms match as substrings. A space in a term
matches any run of separators. Patterns are regexes searched in each lower-case, space-padded view
(upper case, backreferences, named groups and matching "" are refused). Allow phrases follow the term
rules and are blanked out before a view is searched. The leftmost match wins; at one position the
category listed first, then a pattern before a term. Homophones, Chinese terms of three or more
characters and Chinese word-group patterns are also matched by sound in the pinyin view (`chinese`).

Terms match tolerantly in every view: a letter matches one or two of it ("goore" is "gore"), a double
letter exactly two, and "i" and "l" match each other, so "k1ll" and "ki11" both match "kill" without a
second leet view for "1" read as "l" (the price: "kiil" matches too). A view equal to the one before it
is not searched again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import yaml

from stream_processors.gatekeeper.chinese import homophone_regex, pinyin_pattern, pinyin_view
from stream_processors.gatekeeper.normalisation import _REPEAT, _fold, _views

DEFAULT_POLICY_PATH = Path(__file__).parent / "policy.yaml"
_SEP_ATOM = r"[\W_]+"
_PATTERN_FORBIDDEN = re.compile(r"\\[1-9]|\\g<|\(\?P[<=]")
_ESCAPE = re.compile(r"\\.")


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
        """Whether a rule of ``category`` blocks even in a framed text, without asking the model."""
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
        categories = {name: _category(name, body) for name, body in raw_categories.items()}
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


def _category(name: Any, body: Any) -> Rules:
    """The compiled rules of one entry of ``categories``; ValueError names the offending key."""
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
    return Rules(terms, patterns, homophones, cues, reason, strict)
