"""Calibration files (sae_steer/calibration.py): round trip, and "auto" resolved in parse_steering."""
from __future__ import annotations

import json

import pytest
import torch

from sae_steer.calibration import (calibration_path, load_calibration, load_for_settings, save_feature_calibration,
                                   save_vector_calibration)
from sae_steer.formats import save_sae, save_vector
from sae_steer.registry import Settings
from sae_steer.spec import ModelFacts, SaeFacts, SteeringError, parse_steering, resolve_auto
from sae_steer.tiny_model import random_sae


def test_vector_round_trip(tmp_path):
    vec = save_vector({1: torch.ones(4), 2: torch.ones(4)}, tmp_path / "cold.safetensors")
    assert load_calibration(vec, "vector") is None
    path = save_vector_calibration(vec, 2, 1.5, score=0.8, per_layer={1: {"coef": 0.5, "score": 0.3},
                                                                      2: {"coef": 1.5, "score": 0.8}})
    assert path == tmp_path / "cold.safetensors.calibration.json"
    cal = load_calibration(vec, "vector")
    assert (cal["layer"], cal["coef"], cal["score"]) == (2, 1.5, 0.8)
    assert cal["per_layer"] == {"1": {"coef": 0.5, "score": 0.3}, "2": {"coef": 1.5, "score": 0.8}}


def test_sae_round_trip_keeps_other_features(tmp_path):
    folder = tmp_path / "sae"
    folder.mkdir()
    save_feature_calibration(folder, 7, "add", 12.0, score=0.5)
    save_feature_calibration(folder, 7, "logit", 4.0)
    save_feature_calibration(folder, 9, "add", 3.0)
    save_feature_calibration(folder, 7, "add", 10.0)  # replaces 12.0
    assert calibration_path(folder, "sae") == folder / "calibration.json"
    cal = load_calibration(folder, "sae")
    assert cal["features"]["7"]["add"]["strength"] == 10.0
    assert cal["features"]["7"]["logit"]["strength"] == 4.0
    assert cal["features"]["9"]["add"]["strength"] == 3.0
    with pytest.raises(ValueError, match="kind"):
        save_feature_calibration(folder, 7, "clamp", 1.0)


def test_broken_file_is_refused(tmp_path):
    vec = save_vector({1: torch.ones(4)}, tmp_path / "v.safetensors")
    calibration_path(vec, "vector").write_text(json.dumps({"kind": "vector", "layer": 1, "coef": "lots"}))
    with pytest.raises(ValueError, match="v.safetensors.calibration.json"):
        load_calibration(vec, "vector")


FACTS = ModelFacts(d_model=4, num_layers=3, steerable_layers=frozenset({1, 2}),
                   saes={"s": SaeFacts(d_sae=10, layer=1, architecture="relu", d_model=4)},
                   vectors={"v": frozenset({1, 2}), "bare": frozenset({2})},
                   calibrations={"v": {"kind": "vector", "layer": 2, "coef": 1.5,
                                       "per_layer": {"1": {"coef": 0.5}, "2": {"coef": 1.5}}},
                                 "s": {"kind": "sae", "features": {"3": {"add": {"strength": 8.0},
                                                                         "logit": {"strength": 4.0}}}}})


def one(iv, **kw):
    return parse_steering({"interventions": [iv], **kw}, FACTS).interventions[0]


def test_auto_resolves_to_the_stored_numbers():
    iv = one({"type": "vector", "vector": "v", "coef": "auto"})
    assert (iv.layer, iv.coef) == (2, 1.5)  # the calibrated layer of a two-layer vector
    iv = one({"type": "vector", "vector": "v", "layer": 1, "coef": "auto"})
    assert (iv.layer, iv.coef) == (1, 0.5)  # that layer's own best coef
    assert one({"type": "sae", "sae": "s", "feature": 3, "mode": "add", "strength": "auto"}).strength == 8.0
    assert one({"type": "logit", "sae": "s", "feature": 3, "strength": "auto"}).strength == 4.0


def test_auto_equals_the_explicit_request():
    auto = {"interventions": [{"type": "vector", "vector": "v", "coef": "auto"},
                              {"type": "sae", "sae": "s", "feature": 3, "mode": "add", "strength": "auto"}]}
    explicit = {"interventions": [{"type": "vector", "vector": "v", "layer": 2, "coef": 1.5},
                                  {"type": "sae", "sae": "s", "feature": 3, "mode": "add", "strength": 8.0}]}
    assert parse_steering(auto, FACTS) == parse_steering(explicit, FACTS)
    assert parse_steering(auto, FACTS).fingerprint() == parse_steering(explicit, FACTS).fingerprint()
    assert resolve_auto(auto, FACTS.calibrations) == explicit
    assert auto["interventions"][0]["coef"] == "auto"  # the caller's object is not changed
    plain = {"interventions": [{"type": "vector", "vector": "v", "coef": 2.0}]}
    assert resolve_auto(plain, FACTS.calibrations) is plain


@pytest.mark.parametrize("iv, field, match", [
    ({"type": "vector", "vector": "bare", "coef": "auto"}, "coef", "no calibration"),
    ({"type": "vector", "layer": 2, "values": [0.0] * 4, "coef": "auto"}, "coef", "inline vector"),
    ({"type": "sae", "sae": "s", "feature": 4, "mode": "add", "strength": "auto"}, "strength", "no calibrated"),
    ({"type": "logit", "sae": "s", "feature": 4, "strength": "auto"}, "strength", "no calibrated"),
    ({"type": "sae", "sae": "s", "feature": 3, "mode": "scale", "strength": "auto"}, "strength", "mode"),
    ({"type": "sae", "sae": "s", "feature": 3, "mode": "clamp", "value": "auto"}, "value", "number"),
])
def test_auto_without_calibration_names_the_field(iv, field, match):
    with pytest.raises(SteeringError, match=match) as e:
        parse_steering({"interventions": [{"type": "vector", "vector": "v", "coef": 1.0}, iv]}, FACTS)
    assert e.value.field == f"steering.interventions[1].{field}"


def test_settings_read_calibrations(tmp_path):
    sae = save_sae(random_sae(4, 10, 1, "relu", seed=0), tmp_path / "sae")
    vec = save_vector({2: torch.ones(4)}, tmp_path / "v.safetensors")
    other = save_vector({2: torch.ones(4)}, tmp_path / "w.safetensors")
    save_vector_calibration(vec, 2, 3.0)
    save_feature_calibration(sae, 5, "logit", 6.0)
    settings = Settings.from_additional_config({"sae_steer": {"saes": {"s": str(sae)},
                                                              "vectors": {"v": str(vec), "w": str(other)}}})
    facts = settings.model_facts(4, 3)
    assert set(facts.calibrations) == {"s", "v"}
    assert facts.calibrations == load_for_settings(settings.saes, settings.vectors)
    assert one_of(facts, {"type": "logit", "sae": "s", "feature": 5, "strength": "auto"}).strength == 6.0


def one_of(facts, iv):
    return parse_steering({"interventions": [iv]}, facts).interventions[0]
