"""Validation of the `steering` object: every bad input names its field."""
from __future__ import annotations

import math

import pytest

from sae_steer.spec import ModelFacts, SaeFacts, SteeringError, parse_steering

FACTS = ModelFacts(d_model=4, num_layers=3, steerable_layers=frozenset({1, 2}),
                   saes={"s": SaeFacts(d_sae=10, layer=1, architecture="relu", d_model=4)},
                   vectors={"v": frozenset({2})}, max_interventions=3)


def sae(**kw):
    return {"type": "sae", "sae": "s", "feature": 1, "mode": "add", "strength": 1.0, **kw}


def vec(**kw):
    return {"type": "vector", "vector": "v", "coef": 1.0, **kw}


def inline(**kw):
    return {"type": "vector", "layer": 2, "values": [0.1, 0.2, 0.3, 0.4], **kw}


def steer(*ivs, **kw):
    return {"interventions": list(ivs), **kw}


BAD = [
    ("not an object", [1, 2], "steering"),
    ("no interventions", {}, "steering.interventions"),
    ("empty interventions", steer(), "steering.interventions"),
    ("unknown key", steer(sae(), colour="red"), "steering.colour"),
    ("bad positions", steer(sae(), positions="middle"), "steering.positions"),
    ("unknown type", steer({"type": "lora"}), "steering.interventions[0]"),
    ("unknown sae", steer(sae(sae="nope")), "steering.interventions[0].sae"),
    ("feature out of range", steer(vec(), sae(feature=10)), "steering.interventions[1].feature"),
    ("negative feature", steer(sae(feature=-1)), "steering.interventions[0].feature"),
    ("feature as string", steer(sae(feature="3")), "steering.interventions[0].feature"),
    ("bad mode", steer(sae(mode="boost")), "steering.interventions[0].mode"),
    ("nan strength", steer(sae(strength=math.nan)), "steering.interventions[0].strength"),
    ("inf strength", steer(sae(strength=math.inf)), "steering.interventions[0].strength"),
    ("absurd strength", steer(sae(strength=1e9)), "steering.interventions[0].strength"),
    ("clamp without value", steer(sae(mode="clamp", strength=None)), "steering.interventions[0]"),
    ("value on add", steer(sae(value=2.0)), "steering.interventions[0]"),
    ("when feature out of range", steer(sae(when={"feature": 99})), "steering.interventions[0].when.feature"),
    ("when nan", steer(sae(when={"feature": 2, "above": math.nan})), "steering.interventions[0].when.above"),
    ("unknown vector", steer(vec(vector="angry")), "steering.interventions[0].vector"),
    ("vector at a layer it lacks", steer(vec(layer=1)), "steering.interventions[0].layer"),
    ("vector and values", steer(vec(values=[0.0] * 4, layer=2)), "steering.interventions[0]"),
    ("inf coef", steer(vec(coef=-math.inf)), "steering.interventions[0].coef"),
    ("wrong vector length", steer(inline(values=[0.0] * 5)), "steering.interventions[0].values"),
    ("nan in values", steer(inline(values=[0.0, math.nan, 0.0, 0.0])), "steering.interventions[0].values[1]"),
    ("inline without layer", steer(inline(layer=None)), "steering.interventions[0]"),
    ("layer out of range", steer(inline(layer=3)), "steering.interventions[0].layer"),
    ("layer not steerable", steer(inline(layer=0)), "steering.interventions[0].layer"),
    ("too many interventions", steer(sae(), sae(), sae(), sae()), "steering.interventions"),
    ("telemetry offline", steer(sae(), telemetry={"sae": "s"}), "steering.telemetry"),
    ("compare offline", steer(sae(), compare=True), "steering.compare"),
]


@pytest.mark.parametrize("raw,field", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_steering_names_the_field(raw, field):
    with pytest.raises(SteeringError) as e:
        parse_steering(raw, FACTS)
    assert e.value.field == field
    assert str(e.value).startswith(field + ":")


def test_good_steering_parses_and_fingerprints_stably():
    raw = steer(sae(), sae(mode="scale", strength=None, factor=2.0, when={"feature": 3, "above": 0.5}),
                sae(mode="ablate", strength=None), positions="generated")
    a, b = parse_steering(raw, FACTS), parse_steering(dict(reversed(list(raw.items()))), FACTS)
    assert a.fingerprint() == b.fingerprint()
    assert a.interventions[1].edit_coefficients() == (2.0, 0.0)
    assert a.interventions[2].edit_coefficients() == (0.0, 0.0)
    assert parse_steering(steer(sae(strength=2.0)), FACTS).fingerprint() != a.fingerprint()
    assert parse_steering(steer(inline(), vec()), FACTS).interventions[0].layer == 2


def test_an_admitted_steering_is_taken_as_is_for_its_facts_and_checked_again_for_others():
    from dataclasses import replace

    from sae_steer.spec import Admitted
    raw = {"interventions": [{"type": "vector", "layer": 1, "values": [1.0, 2.0, 3.0, 4.0], "coef": 2.0}]}
    steering = parse_steering(raw, FACTS)
    assert parse_steering(Admitted(steering, FACTS), FACTS) is steering
    assert parse_steering(Admitted(steering, replace(FACTS)), FACTS) == steering  # equal facts, another object
    narrower = replace(FACTS, steerable_layers=frozenset({2}))
    with pytest.raises(SteeringError) as e:
        parse_steering(Admitted(steering, FACTS), narrower)
    assert e.value.field == "steering.interventions[0].layer"
    assert steering.wire() == {**raw, "positions": "all"}
