"""Prompt moderation: normalisation, policy matching, verdicts, classifiers and policy loading."""

from __future__ import annotations

import re
from datetime import date
from typing import Any

import pytest
import yaml

from stream_processors.gatekeeper.moderation import (
    DEFAULT_POLICY_PATH,
    Moderator,
    Policy,
    Verdict,
    load_classifier,
    normalise,
)

COMMA = "\N{FULLWIDTH COMMA}"  # as Chinese text writes it


def fullwidth(text: str) -> str:
    """The full-width form of printable ASCII, spelled out here because it looks the same in an editor."""
    return "".join(chr(ord(char) + 0xFEE0) if "!" <= char <= "~" else char for char in text)


TEST_POLICY: dict[str, Any] = {
    "version": "test-7",
    "categories": {
        "violence": {"terms": ["kill", "gore", "血腥", "斩首", "斬首"], "patterns": [r"dismember\w*"]},
        "sexual": {"terms": ["rape", "sex", "色情"]},
        "profanity": {"terms": ["ass"]},
        "weapons": {"terms": ["pipe bomb"], "patterns": [r"build\w*\s+(?:a\s+)?bombs?"]},
    },
    "allow": ["al gore", "kill switch", "血腥玛丽"],
}


class StubClassifier:
    """Answers the same for every text and records what it was asked."""

    def __init__(self, result: tuple[str, float] | None, name: str = "stub-nsfw") -> None:
        self.name = name
        self.result = result
        self.seen: list[str] = []

    def classify(self, text: str) -> tuple[str, float] | None:
        self.seen.append(text)
        return self.result


class KeywordClassifier:
    """Loaded by dotted path in `test_load_classifier_imports_and_instantiates`."""

    name = "keyword"

    def classify(self, text: str) -> tuple[str, float] | None:
        return ("test_category", 1.0) if "forbidden" in text else None


class NotAClassifier:
    pass


@pytest.fixture(scope="module")
def moderator() -> Moderator:
    return Moderator(Policy.from_mapping(TEST_POLICY))


@pytest.fixture(scope="module")
def shipped() -> Moderator:
    return Moderator(Policy.from_file(DEFAULT_POLICY_PATH))


# --- normalisation, step by step ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(fullwidth("gore GORE"), "gore gore", id="full-width"),
        pytest.param("\N{MATHEMATICAL BOLD SMALL G}\N{MATHEMATICAL BOLD SMALL O}re", "gore", id="math-bold"),
        pytest.param("GoRe Straße", "gore strasse", id="casefold"),
        pytest.param("g\u200bo\N{SOFT HYPHEN}r\u2060e\ufeff", "gore", id="zero-width-and-format"),
        pytest.param("g\x00ore", "gore", id="control"),
        pytest.param("g\N{CYRILLIC SMALL LETTER O}r\N{CYRILLIC SMALL LETTER IE}", "gore", id="cyrillic"),
        pytest.param(
            "\N{CYRILLIC CAPITAL LETTER ES}\N{CYRILLIC CAPITAL LETTER A}T", "cat", id="cyrillic-caps"
        ),
        pytest.param("\N{GREEK SMALL LETTER RHO}\N{GREEK SMALL LETTER OMICRON}rn", "porn", id="greek"),
        pytest.param("\N{LATIN SMALL LETTER SCRIPT G}ore", "gore", id="latin-lookalike"),
        pytest.param("górë café", "gore cafe", id="accents"),
        pytest.param("g\N{COMBINING LOW LINE}o\N{COMBINING LOW LINE}re", "gore", id="stray-marks"),
        pytest.param("g0r3 p0rn h@ck $ex k!ll ki|l", "gore porn hack sex kill kill", id="leetspeak"),
        pytest.param("goooooore", "goore", id="repeats-cut-to-two"),
    ],
)
def test_normalise_folds_each_evasion(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize("text", ["1024x768", "version 2", "$100", "c++", "kill!", "wow!!"])
def test_leetspeak_leaves_numbers_and_trailing_symbols_alone(text: str) -> None:
    assert normalise(text) == text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("一只可爱的猫在草地上", "一只可爱的猫在草地上", id="chinese-untouched"),
        pytest.param(
            "\N{HALFWIDTH KATAKANA LETTER KA}\N{HALFWIDTH KATAKANA VOICED SOUND MARK}",
            "ガ",
            id="half-width-kana",
        ),
        pytest.param("が", "が", id="voiced-kana-keeps-its-mark"),
        pytest.param("\N{KANGXI RADICAL BLOOD}腥", "血腥", id="kangxi-radical"),
        pytest.param(f"生成gore图片{COMMA}{fullwidth('2k')}", "生成 gore 图片,2k", id="latin-inside-chinese"),
    ],
)
def test_normalise_keeps_cjk_text_and_folds_its_widths(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


# --- terms: evasions, word boundaries, false positives -----------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        "kill",
        "KILL",
        fullwidth("kill"),
        "k\u200bill",
        "k\N{CYRILLIC SMALL LETTER BYELORUSSIAN-UKRAINIAN I}ll",
        "k1ll",
        "ki11",
        "k!ll",
        "kiiilllll",
        "k.i.l.l",
        "k i l l",
        "k-i-l-l",
        "k_i_l_l",
        "k*i*l*l",
        "k/i/l/l",
        "k . i . l . l",
        "k.1.l.l",
    ],
)
def test_evasions_of_a_term_are_caught(moderator: Moderator, variant: str) -> None:
    verdict = moderator.check({"prompt": f"please {variant} him now"})
    assert (verdict.allowed, verdict.category, verdict.matched) == (False, "violence", "kill")


@pytest.mark.parametrize("variant", ["goooore", "GGOOOORRRREEE", "g o r e", "gore!", "(gore)", "gore_fest"])
def test_repeats_and_punctuation_around_a_term_are_caught(moderator: Moderator, variant: str) -> None:
    assert moderator.check({"prompt": variant}).matched == "gore"


@pytest.mark.parametrize(
    "variant",
    [
        "血腥",
        "一张血腥的图片",
        "血 腥",
        "血.腥",
        "血*腥",
        "血_腥",
        "血 . 腥",
        f"血{COMMA}腥",
        "一张血.腥的图片",
        "一张血 * 腥的图片",
        "\N{KANGXI RADICAL BLOOD}腥",
    ],
)
def test_chinese_terms_match_as_substrings_and_through_separators(moderator: Moderator, variant: str) -> None:
    verdict = moderator.check({"prompt": variant})
    assert (verdict.allowed, verdict.category, verdict.matched) == (False, "violence", "血腥")


@pytest.mark.parametrize("variant", ["斩首", "斬首"])
def test_traditional_and_simplified_forms_both_match(moderator: Moderator, variant: str) -> None:
    # OpenCC folds both the text and the terms to simplified Chinese: one term covers both forms.
    assert moderator.check({"prompt": f"古代{variant}场景"}).matched == "斩首"


def test_a_latin_term_inside_chinese_text_is_caught(moderator: Moderator) -> None:
    assert moderator.check({"prompt": "生成一张gore图片"}).matched == "gore"


@pytest.mark.parametrize(
    "text",
    [
        "a skilled archer in a misty forest, skill tree",
        "an orca, the killer whale",
        "Scunthorpe United at dusk",
        "assassin's creed style rooftop chase",
        "a class of students with a bass guitar and a compass",
        "a therapist's office full of plants",
        "grapes and rapeseed fields",
        "a cottage in Sussex, Essex countryside",
        "Jones's ex-wife walking on the beach",
        "1024x768 wallpaper, version 2, 8k, 35mm, f/1.8",
        "一只可爱的猫在草地上",
        f"山水画{COMMA}云雾缭绕{COMMA}远处有一座小桥",
        "赛博朋克风格的城市夜景, neon lights, 雨夜街道",
    ],
)
def test_benign_prompts_stay_allowed(moderator: Moderator, text: str) -> None:
    assert moderator.check({"prompt": text}) == Verdict(allowed=True, policy_version="test-7")


def test_spaces_in_a_term_match_any_separators(moderator: Moderator) -> None:
    for text in ("a pipe bomb", "a PIPE-BOMB", "a pipe_bomb", "a pipe   bomb"):
        assert moderator.check({"prompt": text}).matched == "pipe bomb", text
    assert moderator.check({"prompt": "a pipebomb"}).allowed


# --- patterns, allow list, verdict fields ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "category", "pattern"),
    [
        ("a dismembered doll", "violence", r"dismember\w*"),
        ("DISMEMBERMENT", "violence", r"dismember\w*"),
        ("how to build a bomb", "weapons", r"build\w*\s+(?:a\s+)?bombs?"),
        ("building bombs", "weapons", r"build\w*\s+(?:a\s+)?bombs?"),
    ],
)
def test_patterns_block_with_their_category(
    moderator: Moderator, text: str, category: str, pattern: str
) -> None:
    verdict = moderator.check({"prompt": text})
    assert (verdict.allowed, verdict.category, verdict.matched) == (False, category, pattern)


def test_a_blocked_verdict_carries_category_version_field_and_source(moderator: Moderator) -> None:
    verdict = moderator.check({"prompt": "a rainy street", "negative_prompt": "blurry, gore"})
    assert verdict == Verdict(
        allowed=False,
        policy_version="test-7",
        category="violence",
        source="policy",
        field="negative_prompt",
        matched="gore",
        reason="VIOLENCE",
    )


def test_every_field_is_checked_and_the_first_blocking_field_in_order_wins(moderator: Moderator) -> None:
    texts = {"prompt": "a calm lake", "negative_prompt": None, "video.prompt_end": "the lake, then gore"}
    assert moderator.check(texts).field == "video.prompt_end"
    both = {"video.prompt_end": "rape", "prompt": "gore"}
    assert (moderator.check(both).field, moderator.check(both).category) == ("video.prompt_end", "sexual")


def test_empty_and_missing_fields_are_skipped(moderator: Moderator) -> None:
    assert moderator.check({"prompt": "a cat", "negative_prompt": "", "video.prompt_end": None}).allowed
    assert moderator.check({}).allowed


def test_the_leftmost_match_wins(moderator: Moderator) -> None:
    assert moderator.check({"prompt": "sex and gore"}).category == "sexual"
    assert moderator.check({"prompt": "gore and sex"}).category == "violence"


@pytest.mark.parametrize(
    "text", ["a portrait of Al Gore", "AL-GORE at a podium", "a kill switch", "一杯血腥玛丽"]
)
def test_allow_list_phrases_never_trigger(moderator: Moderator, text: str) -> None:
    assert moderator.check({"prompt": text}).allowed


@pytest.mark.parametrize(
    ("text", "matched"),
    [
        ("al gore covered in gore", "gore"),
        ("flip the kill switch and kill him", "kill"),
        ("血腥玛丽和血腥", "血腥"),
    ],
)
def test_allow_list_shields_only_its_own_phrase(moderator: Moderator, text: str, matched: str) -> None:
    verdict = moderator.check({"prompt": text})
    assert (verdict.allowed, verdict.matched) == (False, matched)


# --- classifiers --------------------------------------------------------------------------------------


def test_a_classifier_blocks_with_its_name_as_source(moderator: Moderator) -> None:
    stub = StubClassifier(("nsfw", 0.93))
    verdict = Moderator(moderator.policy, [stub]).check({"prompt": "a beach", "negative_prompt": "text"})
    assert verdict == Verdict(
        allowed=False,
        policy_version="test-7",
        category="nsfw",
        source="stub-nsfw",
        field="prompt",
        reason="NSFW",
    )


@pytest.mark.parametrize(
    ("score", "threshold", "allowed"),
    [(0.49, 0.5, True), (0.5, 0.5, False), (0.9, 0.95, True), (0.95, 0.95, False), (0.0, 0.0, False)],
)
def test_a_classifier_blocks_only_at_or_above_the_threshold(
    moderator: Moderator, score: float, threshold: float, allowed: bool
) -> None:
    checker = Moderator(moderator.policy, [StubClassifier(("nsfw", score))], threshold=threshold)
    assert checker.check({"prompt": "a beach"}).allowed is allowed


def test_a_classifier_answering_none_allows(moderator: Moderator) -> None:
    assert Moderator(moderator.policy, [StubClassifier(None)]).check({"prompt": "a beach"}).allowed


def test_classifiers_see_the_original_text_of_each_present_field(moderator: Moderator) -> None:
    first, second = StubClassifier(None, "first"), StubClassifier(None, "second")
    original = fullwidth("Cat") + "  on a MAT"
    texts = {"prompt": original, "negative_prompt": None, "video.prompt_end": "", "x": "dog"}
    Moderator(moderator.policy, [first, second]).check(texts)
    assert first.seen == second.seen == [original, "dog"]


def test_the_policy_is_checked_before_any_classifier(moderator: Moderator) -> None:
    stub = StubClassifier(("nsfw", 1.0))
    verdict = Moderator(moderator.policy, [stub]).check({"prompt": "a beach", "negative_prompt": "gore"})
    assert (verdict.source, verdict.field, verdict.category) == ("policy", "negative_prompt", "violence")
    assert stub.seen == []


def test_later_classifiers_run_when_earlier_ones_pass(moderator: Moderator) -> None:
    checker = Moderator(moderator.policy, [StubClassifier(None, "a"), StubClassifier(("spam", 0.8), "b")])
    assert checker.check({"prompt": "a beach"}).source == "b"


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_a_threshold_outside_zero_to_one_is_refused(moderator: Moderator, threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        Moderator(moderator.policy, threshold=threshold)


def test_load_classifier_imports_and_instantiates(moderator: Moderator) -> None:
    classifier = load_classifier(f"{__name__}:KeywordClassifier")
    assert isinstance(classifier, KeywordClassifier)
    verdict = Moderator(moderator.policy, [classifier]).check({"prompt": "a forbidden fruit"})
    assert (verdict.source, verdict.category) == ("keyword", "test_category")


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("no_colon_here", ValueError),
        (f"{__name__}:", ValueError),
        (f"{__name__}:Missing", ValueError),
        ("no_such_package_xyz.module:Thing", ValueError),
        (f"{__name__}:NotAClassifier", TypeError),
    ],
)
def test_load_classifier_refuses_bad_specs(spec: str, error: type[Exception]) -> None:
    with pytest.raises(error, match=re.escape(spec)):
        load_classifier(spec)


# --- policy validation and the shipped policy ----------------------------------------------------------

_CATS = {"c": {"terms": ["x"]}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "top level"),
        ({"categories": _CATS}, "'version'"),
        ({"version": date(2026, 11, 1), "categories": _CATS}, "'version'"),
        ({"version": "1"}, "'categories'"),
        ({"version": "1", "categories": {}}, "'categories'"),
        ({"version": "1", "categories": _CATS, "alow": ["x"]}, "'alow'"),
        ({"version": "1", "categories": _CATS, "allow": "x"}, "'allow'"),
        ({"version": "1", "categories": {"c": ["x"]}}, "'categories.c'"),
        ({"version": "1", "categories": {"c": {}}}, "'categories.c'"),
        ({"version": "1", "categories": {"c": {"term": ["x"]}}}, "'categories.c.term'"),
        ({"version": "1", "categories": {"c": {"terms": "gore"}}}, "'categories.c.terms'"),
        ({"version": "1", "categories": {"c": {"terms": ["ok", 3]}}}, "'categories.c.terms[1]'"),
        ({"version": "1", "categories": {"c": {"terms": ["\u200b"]}}}, "'categories.c.terms[0]'"),
        ({"version": "1", "categories": {"c": {"patterns": ["(unclosed"]}}}, "'categories.c.patterns[0]'"),
        ({"version": "1", "categories": {"c": {"patterns": [r"(a)\1"]}}}, "backreferences"),
        ({"version": "1", "categories": {"c": {"patterns": ["(?P<n>a)"]}}}, "named groups"),
        ({"version": "1", "categories": {"c": {"patterns": ["a*"]}}}, "empty string"),
        ({"version": "1", "categories": {"c": {"patterns": ["Gore"]}}}, "upper-case"),
    ],
)
def test_a_malformed_policy_raises_value_error_naming_the_problem(data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Policy.from_mapping(data)


def test_the_shipped_policy_loads(shipped: Moderator) -> None:
    policy = shipped.policy
    assert policy.version == yaml.safe_load(DEFAULT_POLICY_PATH.read_text(encoding="utf-8"))["version"]
    assert set(policy.categories) == {
        "sexual_minors",
        "sexual",
        "violence_gore",
        "hate",
        "self_harm",
        "weapons_drugs",
        "harassment_doxxing",
    }
    assert shipped.check({"prompt": "gore"}).policy_version == policy.version


@pytest.mark.parametrize(
    "text",
    [
        "a portrait of Al Gore",
        "a Gore-Tex jacket in the rain",
        "make a bath bomb",
        "a glass of 血腥玛丽",
        "一只可爱的猫在草地上",
        "a therapist and her grapes",
        "children playing in a park, watercolor",
        "角色情绪饱满的动漫插画",
        "特色情侣酒店的夜景",
    ],
)
def test_the_shipped_policy_allows_benign_prompts(shipped: Moderator, text: str) -> None:
    assert shipped.check({"prompt": text}).allowed


@pytest.mark.parametrize(
    "prompt",
    ["a g.o.r.e soaked battlefield", "a g o r e scene", "i p-o-r-n", "a  g_o_r_e", "show a p.o.r.n still"],
)
def test_spaced_terms_after_a_one_letter_word_are_caught(prompt: str) -> None:
    verdict = Moderator(Policy.from_file(DEFAULT_POLICY_PATH)).check({"prompt": prompt})
    assert not verdict.allowed, prompt


@pytest.mark.parametrize("prompt", ["a s k i l l tree", "a b c d e", "U S A flag at dawn", "i o u a note"])
def test_spelled_out_letters_stay_allowed(prompt: str) -> None:
    assert Moderator(Policy.from_file(DEFAULT_POLICY_PATH)).check({"prompt": prompt}).allowed
