"""The HTTP server's check of a request that names a vector built over HTTP: the vector becomes inline
vectors (one per layer, the workers never saw its file), checked as inline values are, and the result is
admitted as is by vLLM's admission (no second parse in the API process)."""
from __future__ import annotations

import pytest
import torch

from sae_steer.server.state import SteeringState
from sae_steer.spec import Admitted, ModelFacts, SteeringError, parse_steering

FACTS = ModelFacts(d_model=4, num_layers=3, steerable_layers=frozenset({1, 2}), vectors={"v": frozenset({2})})


def server_state(built: dict) -> SteeringState:
    st = SteeringState.__new__(SteeringState)  # only what check_steering reads: no engine needed
    st.facts, st.built, st.built_calibrations = FACTS, built, {}
    return st


def test_a_built_vector_becomes_inline_vectors_admitted_for_the_served_facts():
    a, b = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.25, 0.0, -1.0, 2.0])
    st = server_state({"calm": {2: b, 1: a}})
    out = st.check_steering({"interventions": [{"type": "vector", "vector": "calm", "coef": 2.0},
                                               {"type": "vector", "vector": "v"}], "positions": "prompt"})
    assert isinstance(out, Admitted) and out.facts is FACTS
    assert out.steering.wire() == {"positions": "prompt", "interventions": [
        {"type": "vector", "layer": 1, "values": a.tolist(), "coef": 2.0},
        {"type": "vector", "layer": 2, "values": b.tolist(), "coef": 2.0},
        {"type": "vector", "vector": "v", "coef": 1.0}]}
    assert parse_steering(out, FACTS) is out.steering  # admission takes it as is
    one = st.check_steering({"interventions": [{"type": "vector", "vector": "calm", "layer": 2, "coef": -1.0}]})
    assert one.steering.wire()["interventions"] == [{"type": "vector", "layer": 2, "values": b.tolist(), "coef": -1.0}]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2e4])
def test_a_built_vector_with_values_an_inline_vector_may_not_have_is_refused_naming_the_field(bad):
    st = server_state({"calm": {1: torch.tensor([1.0, bad, 0.0, 0.0])}})
    with pytest.raises(SteeringError) as e:
        st.check_steering({"interventions": [{"type": "vector", "layer": 2, "values": [0.0] * 4},
                                             {"type": "vector", "vector": "calm"}]})
    assert e.value.field == "steering.interventions[1].vector" and "calm" in e.value.message


def test_unknown_names_list_the_built_vectors_too():
    st = server_state({"calm": {1: torch.zeros(4)}})
    with pytest.raises(SteeringError) as e:
        st.check_steering({"interventions": [{"type": "vector", "vector": "angry"}]})
    assert e.value.field == "steering.interventions[0].vector" and "'calm'" in e.value.message
