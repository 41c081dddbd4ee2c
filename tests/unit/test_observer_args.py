"""The internal telemetry / capture objects of extra_args: every malformed value names its field."""
from __future__ import annotations

import pytest

from sae_steer.spec import ModelFacts, SaeFacts, SteeringError, parse_capture, parse_telemetry

FACTS = ModelFacts(d_model=4, num_layers=3, steerable_layers=frozenset({1, 2}),
                   saes={"s": SaeFacts(d_sae=10, layer=1, architecture="relu", d_model=4)})
ID = "0123abcd" * 4
T, C = "sae_steer_telemetry", "sae_steer_capture"

BAD_TELEMETRY = [
    ("x", T), (["s"], T), ({"sae": "s", "top_k": 3}, f"{T}.id"), ({"sae": "s", "id": 5}, f"{T}.id"),
    ({"sae": "s", "id": "../../etc/passwd"}, f"{T}.id"), ({"sae": "s", "id": ""}, f"{T}.id"),
    ({"sae": "s", "id": "a" * 65}, f"{T}.id"), ({"sae": "s", "id": "-rf"}, f"{T}.id"),
    ({"sae": "s", "id": "a.b"}, f"{T}.id"), ({"sae": "nope", "id": ID}, f"{T}.sae"), ({"sae": ["s"], "id": ID}, f"{T}.sae"),
    ({"id": ID}, f"{T}.sae"), ({"sae": "s", "id": ID, "top_k": 0}, f"{T}.top_k"),
    ({"sae": "s", "id": ID, "top_k": 257}, f"{T}.top_k"), ({"sae": "s", "id": ID, "top_k": True}, f"{T}.top_k"),
    ({"sae": "s", "id": ID, "top_k": 2.5}, f"{T}.top_k"), ({"sae": "s", "id": ID, "path": "/x"}, f"{T}.path"),
]
BAD_CAPTURE = [
    ("x", C), (None, C), ({"layers": [1]}, f"{C}.id"), ({"id": "a/b", "layers": [1]}, f"{C}.id"),
    ({"id": ID}, f"{C}.layers"), ({"id": ID, "layers": []}, f"{C}.layers"), ({"id": ID, "layers": 1}, f"{C}.layers"),
    ({"id": ID, "layers": [0]}, f"{C}.layers[0]"), ({"id": ID, "layers": [1, 7]}, f"{C}.layers[1]"),
    ({"id": ID, "layers": [True]}, f"{C}.layers"), ({"id": ID, "layers": ["1"]}, f"{C}.layers"),
    ({"id": ID, "layers": [1] * 50}, f"{C}.layers"), ({"id": ID, "layers": [1], "x": 1}, f"{C}.x"),
    ({"id": ID, "layers": [1], "positions": "first"}, f"{C}.positions"),
    ({"id": ID, "layers": [1], "positions": ["all"]}, f"{C}.positions"),
]


@pytest.mark.parametrize("raw,field", BAD_TELEMETRY)
def test_bad_internal_telemetry_names_its_field(raw, field):
    with pytest.raises(SteeringError) as e:
        parse_telemetry(raw, FACTS, T, internal=True)
    assert e.value.field == field, e.value


@pytest.mark.parametrize("raw,field", BAD_CAPTURE)
def test_bad_capture_names_its_field(raw, field):
    with pytest.raises(SteeringError) as e:
        parse_capture(raw, FACTS, C)
    assert e.value.field == field, e.value


def test_good_objects_come_back_canonical():
    assert parse_telemetry({"sae": "s", "id": ID}, FACTS, T, internal=True) == {"sae": "s", "top_k": 5, "id": ID}
    capture = parse_capture({"id": ID, "layers": [2, 1, 2]}, FACTS, C)
    assert capture["id"] == ID and capture["layers"] == [1, 2] and capture["positions"] == "last"
    assert parse_capture({"id": ID, "layers": [1], "positions": "all"}, FACTS, C)["positions"] == "all"


def test_clients_never_supply_the_id():
    """Over HTTP the server makes the id; a client's own id (to read another request's file) is refused."""
    with pytest.raises(SteeringError) as e:
        parse_telemetry({"sae": "s", "id": ID}, FACTS)
    assert e.value.field == "telemetry.id"
