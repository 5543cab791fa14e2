"""A word-level CLIP tokenizer for the demo captions (the ``vocab.json`` and ``merges.txt`` it reads).

CLIP's tokenizer is byte-level BPE: text is lower-cased, split into words (a run of letters, a digit, or a run
of
punctuation), each word's UTF-8 bytes become symbols with ``</w>`` on the last, and merges join symbols in
rank
order. Here the merges are chosen so that every English word of the captions ends as ONE token, and every
Chinese character as one token (CLIP's split keeps a run of Chinese letters as one word, so each character
gets
a token both inside a run and, with ``</w>``, at its end). Any other text still tokenizes, into byte tokens,
exactly as with the tiny model's tokenizer: the byte vocabulary comes from `gpu_consumers.models`.

Each word's merges are found by running the BPE on it with the merges chosen so far and, while it is still in
pieces, appending the merge of its first two pieces. Appended merges rank after all earlier ones, so they
never
change how an earlier word splits; a unit test checks every word against the real tokenizer.

Consumes: caption strings. Produces: the vocabulary mapping and the merges text.
"""

from __future__ import annotations

import itertools
import re

from gpu_consumers.models import BOS, END_OF_WORD, EOS, _bytes_to_unicode

# CLIP's pre-tokenizer pattern, without its special tokens and contractions (the captions have none).
_WORD = re.compile(r"[^\W\d_]+|\d|[^\s\w]+", re.UNICODE)


def _symbols(unit: str, final: bool) -> list[str]:
    table = _bytes_to_unicode()
    symbols = [table[b] for b in unit.encode("utf-8")]
    if final:
        symbols[-1] += END_OF_WORD
    return symbols


def _apply(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE: repeatedly join the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(itertools.pairwise(symbols))]
        known = [(r, i) for r, i in pairs if r is not None]
        if not known:
            break
        _, i = min(known)
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def units(captions: list[str]) -> list[tuple[str, bool]]:
    """The pieces that should be one token each: (text, is the end of its word)."""
    found: dict[tuple[str, bool], None] = {}
    for text in captions:
        for word in _WORD.findall(text.lower()):
            if word.isascii():
                found[(word, True)] = None
                continue
            for i, char in enumerate(word):  # Chinese: one token per character, inside a run and at its end
                found[(char, False)] = None
                found[(char, True)] = None
                if i == len(word) - 1:
                    break
    return list(found)


def tokenizer_files(captions: list[str]) -> tuple[dict[str, int], str]:
    """``vocab.json`` mapping and ``merges.txt`` text covering every word of ``captions``."""
    table = _bytes_to_unicode()
    chars = list(table.values())
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for unit, final in units(captions):
        symbols = _apply(_symbols(unit, final), ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = _apply(symbols, ranks)
    merged = list(dict.fromkeys(a + b for a, b in merges))
    tokens = [
        *chars,
        *(c + END_OF_WORD for c in chars),
        *(t for t in merged if t not in set(chars)),
        BOS,
        EOS,
    ]
    tokens = list(dict.fromkeys(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return vocab, text
