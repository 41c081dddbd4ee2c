"""The eval judges (sae_steer/evaluate.py) on fixed texts and numbers: the thresholds written in its docstring."""
from __future__ import annotations

import math

import pytest

from sae_steer.evaluate import (concept_hits, concept_score, distinct_trigram_ratio, fluency_score, harmonic_mean,
                                load_concept, load_instructions, relevance_score)

COLD = load_concept("cold").words


@pytest.mark.parametrize("text, hits, score", [
    ("The weather in California is generally warm and dry.", 0, 0),
    ("It is warm today, but the nights can get chilly.", 1, 1),
    ("Snow fell all night and the roads were icy by morning.", 2, 2),
    ("WINTER is coming: Snowflakes, blizzards and frozen lakes!", 4, 2),
    ("The coldness of the icicles", 2, 2),  # plural 's' dropped: icicles -> icicle
    ("Scold the snowboarder", 0, 0),  # whole words only: 'scold' is not 'cold', 'snowboarder' is not 'snow'
])
def test_concept_judge(text, hits, score):
    assert concept_hits(text, COLD) == hits
    assert concept_score(text, COLD) == score


def test_repetition_ratio():
    assert distinct_trigram_ratio("one two three four five") == 1.0
    assert distinct_trigram_ratio("and and and and and and") == pytest.approx(1 / 4)
    assert distinct_trigram_ratio("hi") == 1.0


FLUENT = "The weather in California is generally warm and dry, with mild winters."
REPEATED = "cold cold cold cold cold cold cold cold cold cold"
LOOPING = "we walked in the snow and we walked in the snow and then went home to rest"


@pytest.mark.parametrize("text, nll, base, score", [
    (FLUENT, 1.0, 1.0, 2),
    (FLUENT, 1.5, 1.0, 2),  # base + 0.5: still 2
    (FLUENT, 1.6, 1.0, 1),
    (FLUENT, 2.5, 1.0, 1),
    (FLUENT, 2.6, 1.0, 0),
    (FLUENT, math.inf, 1.0, 0),
    (REPEATED, 0.1, 1.0, 0),  # repetition is likely under the model, and still not fluent
    (LOOPING, 0.5, 1.0, 1),  # distinct trigram ratio 11/15: capped at 1
    ("Yes.", 0.5, 1.0, 0),  # fewer than 3 words
])
def test_fluency_judge(text, nll, base, score):
    assert fluency_score(text, nll, base) == score


@pytest.mark.parametrize("pmi, base, score", [
    (1.0, 1.0, 2), (0.5, 1.0, 2), (0.49, 1.0, 1), (0.2, 1.0, 1), (0.19, 1.0, 0), (-0.3, 1.0, 0),
    (0.03, 0.0, 2), (0.015, 0.0, 1), (0.005, 0.0, 0),  # base floored at 0.05: thresholds 0.025, 0.01
    (-math.inf, 1.0, 0),
])
def test_relevance_judge(pmi, base, score):
    assert relevance_score(pmi, base) == score


def test_harmonic_mean():
    assert harmonic_mean(2, 2, 2) == 2
    assert harmonic_mean(2, 0, 2) == 0
    assert harmonic_mean(1, 2, 2) == pytest.approx(3 / (1 + 0.5 + 0.5))


def test_shipped_data():
    instructions = load_instructions()
    assert len(instructions) >= 48 and len(set(instructions)) == len(instructions)  # 24 select + 24 test at least
    for name in ("cold", "joy", "food", "pirate"):
        concept = load_concept(name)
        assert len(concept.pairs) >= 8, name
        # each contrast pair: the positive text shows the concept, the negative does not
        for pos, neg in concept.pairs:
            assert concept_hits(pos, concept.words) >= 1, (name, pos)
            assert concept_hits(neg, concept.words) == 0, (name, neg)
    with pytest.raises(ValueError, match="unknown concept"):
        load_concept("lukewarm")
