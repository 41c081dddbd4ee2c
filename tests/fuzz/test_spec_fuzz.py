"""Property-based fuzzing of the request schema (sae_steer/spec.py): whatever JSON-ish object a client sends
as `steering` (or the server puts in `telemetry` / `capture`), the outcome is either a valid, bounded
Steering or a SteeringError whose `.field` is a real path into that object; never another exception.

Inputs are near-valid interventions with fields dropped, replaced by random JSON (wrong types, NaN/inf,
huge numbers, deep nesting, long lists) or joined by unknown keys, plus plain random JSON."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_steer.spec import (LogitIntervention, ModelFacts, SaeFacts, SaeIntervention, Steering, SteeringError,
                            VectorIntervention, parse_capture, parse_steering, parse_telemetry)

D_MODEL, D_SAE = 4, 10
FACTS = ModelFacts(d_model=D_MODEL, num_layers=3, steerable_layers=frozenset({1, 2}),
                   saes={"s": SaeFacts(d_sae=D_SAE, layer=1, architecture="relu", d_model=D_MODEL),
                         "t": SaeFacts(d_sae=3, layer=2, architecture="topk", d_model=D_MODEL)},
                   vectors={"v": frozenset({2}), "w": frozenset({1, 2})}, max_interventions=8, max_abs_value=1e4)
# The same model on an engine that refuses logit steering (TP > 1): a `logit` intervention is a 400 there.
FACTS_NO_LOGIT = ModelFacts(**{**FACTS.__dict__, "logit_refusal": "logit steering needs tensor parallel size 1"})

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.data_too_large])

# ---- random JSON-ish values ----

HUGE = st.sampled_from([10**30, -(10**30), 2**63, -(2**63) - 1, 10**400, 1e308, -1e308, 1e-320])
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([math.nan, math.inf, -math.inf, -0.0])
scalars = (st.none() | st.booleans() | st.integers() | HUGE | floats
           | st.text(max_size=12) | st.sampled_from(["", "s", "t", "v", "sae", "vector", "logit", "add", "all",
                                                     "../etc/passwd", "s\x00", "\ud800"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=25)


def deep(depth: int, leaf=1.0):
    """A list nested `depth` deep (built without recursion)."""
    out = leaf
    for _ in range(depth):
        out = [out]
    return out


deeply_nested = st.integers(min_value=50, max_value=5000).map(deep) | st.integers(1, 2000).map(
    lambda n: {"interventions": deep(n)})


def maybe(good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a plausible value, sometimes anything."""
    return st.one_of(good, good, good, json_values)


def floaty(bound: float = 20.0):
    return st.floats(-bound, bound) | st.integers(-5, 5) | floats | HUGE


layer = st.integers(-1, 4) | HUGE


@dataclass(frozen=True)
class World:
    """The names and sizes a near-valid request uses (the server tests pass their own)."""
    saes: tuple = ("s", "t")
    features: int = 3  # features 0..features-1 exist in every SAE above
    vectors: tuple = ("v", "w")
    vector_layer: int = 2  # a layer every vector above has
    inline_layers: tuple = (1, 2)
    d_model: int = D_MODEL
    max_interventions: int = 8


TOY = World()


small = st.floats(-20, 20) | st.integers(-5, 5)
hostile = st.one_of(json_values, floats, HUGE, st.integers(-2, D_SAE + 2), st.integers(-1, 4),
                    st.lists(st.floats(-1, 1), min_size=500, max_size=2000),  # long list
                    st.lists(floaty(), min_size=D_MODEL, max_size=D_MODEL))


@st.composite
def valid_intervention(draw, w: World = TOY):
    kind = draw(st.sampled_from(["sae", "vector", "inline", "logit"]))
    if kind == "sae":
        mode = draw(st.sampled_from(["add", "clamp", "ablate", "scale"]))
        param = {"add": ["strength"], "clamp": ["value"], "ablate": [], "scale": ["factor", "strength"]}[mode]
        out = {"type": "sae", "sae": draw(st.sampled_from(w.saes)), "feature": draw(st.integers(0, w.features - 1)),
               "mode": mode}
        if param:
            out[draw(st.sampled_from(param))] = draw(small)
        if draw(st.booleans()):
            out["when"] = {"feature": draw(st.integers(0, w.features - 1)), "above": draw(small)}
        return out
    if kind == "vector":
        out = {"type": "vector", "vector": draw(st.sampled_from(w.vectors)), "coef": draw(small)}
        if draw(st.booleans()):
            out["layer"] = w.vector_layer
        return out
    if kind == "inline":
        return {"type": "vector", "layer": draw(st.sampled_from(w.inline_layers)), "coef": draw(small),
                "values": draw(st.lists(st.floats(-2, 2), min_size=w.d_model, max_size=w.d_model))}
    return {"type": "logit", "sae": draw(st.sampled_from(w.saes)), "feature": draw(st.integers(0, w.features - 1)),
            "strength": draw(small)}


SCHEMA_KEYS = ["type", "sae", "feature", "mode", "strength", "value", "factor", "when", "vector", "values",
               "layer", "coef"]


@st.composite
def intervention(draw, w: World = TOY):
    """A valid intervention with 0-3 mutations: a field dropped, set to something hostile (a schema key, or a
    `when` sub-field), or an unknown key added."""
    out = draw(valid_intervention(w))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        op = draw(st.sampled_from(["drop", "set", "set", "when", "unknown"]))
        if op == "drop" and out:
            out.pop(draw(st.sampled_from(sorted(out))))
        elif op == "set":
            out[draw(st.sampled_from(SCHEMA_KEYS))] = draw(hostile)
        elif op == "when":
            when = dict(out["when"]) if isinstance(out.get("when"), dict) else {}
            when[draw(st.sampled_from(["feature", "above", "below"]))] = draw(hostile)
            out["when"] = when
        else:
            out[draw(st.text(min_size=1, max_size=6))] = draw(json_values)
    return out


@st.composite
def steering_objects(draw, w: World = TOY):
    obj = {}
    if draw(st.integers(0, 19)):
        ivs = draw(st.lists(maybe(intervention(w)), min_size=0, max_size=w.max_interventions + 2))
        obj["interventions"] = ivs if draw(st.integers(0, 19)) else draw(json_values)
    if draw(st.booleans()):
        obj["positions"] = draw(maybe(st.sampled_from(["all", "prompt", "generated", "middle"])))
    for key in ("telemetry", "compare"):
        if draw(st.integers(0, 19)) == 0:
            obj[key] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        obj[draw(st.text(max_size=6))] = draw(json_values)  # an unknown key (maybe "" or "a.b[0]")
    return obj


any_steering = st.one_of(steering_objects(), steering_objects(), steering_objects(), json_values, deeply_nested)

# ---- the property ----

FIELD_NAMES = {"interventions", "positions", "type", "sae", "feature", "mode", "strength", "value", "factor",
               "when", "above", "vector", "values", "layer", "coef", "top_k", "id", "layers"}


def names_a_real_field(path: str, root, obj) -> bool:
    """Is `path` (e.g. steering.interventions[2].when.feature) a path into `obj`, or a missing field of the
    schema in an object that exists there? Keys may contain '.' or '[': the longest matching key wins."""
    if path != root and not path.startswith(root + ".") and not path.startswith(root + "["):
        return False
    rest = path[len(root):]
    while rest:
        if rest.startswith("["):
            m = re.match(r"\[(\d+)\]", rest)
            if not m or not isinstance(obj, list) or int(m.group(1)) >= len(obj):
                return False
            obj, rest = obj[int(m.group(1))], rest[m.end():]
            continue
        if not rest.startswith(".") or not isinstance(obj, dict):
            return False
        rest = rest[1:]
        keys = [k for k in obj if isinstance(k, str) and rest.startswith(k) and rest[len(k):len(k) + 1] in ("", ".", "[")]
        if not keys:  # a required field that is missing: the schema's name, in an object that exists
            return rest in FIELD_NAMES
        key = max(keys, key=len)
        obj, rest = obj[key], rest[len(key):]
    return True


def check_valid(s: Steering, facts: ModelFacts) -> None:
    """A parsed steering is within the facts' bounds (what the engine relies on)."""
    assert 1 <= len(s.interventions) <= facts.max_interventions
    for iv in s.interventions:
        nums = []
        if isinstance(iv, (SaeIntervention, LogitIntervention)):
            assert iv.sae in facts.saes and 0 <= iv.feature < facts.saes[iv.sae].d_sae
            nums = [getattr(iv, n, None) for n in ("strength", "value", "factor")]
            if isinstance(iv, SaeIntervention) and iv.when is not None:
                assert 0 <= iv.when.feature < facts.saes[iv.sae].d_sae
                nums.append(iv.when.above)
            if isinstance(iv, LogitIntervention):
                assert facts.logit_refusal is None
        else:
            assert isinstance(iv, VectorIntervention)
            nums = [iv.coef]
            if iv.values is not None:
                assert len(iv.values) == facts.d_model and iv.layer in facts.steerable_layers
                nums += iv.values
            else:
                assert iv.vector in facts.vectors and (iv.layer is None or iv.layer in facts.vectors[iv.vector])
        for x in nums:
            assert x is None or (isinstance(x, float) and math.isfinite(x) and abs(x) <= facts.max_abs_value), x
    # What the API process accepts, the worker accepts again after a JSON round trip, unchanged.
    again = parse_steering(json.loads(json.dumps(s.model_dump(mode="json", exclude_none=True))), facts)
    assert again == s and again.fingerprint() == s.fingerprint()


def outcome(parse, raw, root: str):
    try:
        return parse(raw)
    except SteeringError as e:
        assert names_a_real_field(e.field, root, raw), f"{e.field!r} is not a path into the input: {e}"
        assert e.field in str(e)
        return None
    # any other exception fails the test: that is the property


@SETTINGS
@given(raw=any_steering, facts=st.sampled_from([FACTS, FACTS_NO_LOGIT]))
def test_parse_steering_accepts_or_names_the_field(raw, facts):
    s = outcome(lambda r: parse_steering(r, facts), raw, "steering")
    if s is not None:
        assert isinstance(s, Steering)
        check_valid(s, facts)


def test_the_generators_reach_valid_steering():
    """The near-valid generator produces accepted requests too, so check_valid is exercised."""
    seen = []

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(raw=st.lists(intervention(), min_size=1, max_size=2).map(lambda ivs: {"interventions": ivs}))
    def probe(raw):
        try:
            seen.append(parse_steering(raw, FACTS))
        except SteeringError:
            pass

    probe()
    assert len(seen) >= 10, f"only {len(seen)} of 300 generated requests were valid"
    kinds = {type(iv).__name__ for s in seen for iv in s.interventions}
    assert {"SaeIntervention", "VectorIntervention", "LogitIntervention"} <= kinds, kinds


telemetry_objects = st.one_of(
    json_values, deeply_nested,
    st.fixed_dictionaries({}, optional={"sae": maybe(st.sampled_from(["s", "t", "nope"])),
                                        "top_k": maybe(st.integers(-1, 300)), "id": maybe(st.text(max_size=70)),
                                        "extra": json_values}))
capture_objects = st.one_of(
    json_values, deeply_nested,
    st.fixed_dictionaries({}, optional={"id": maybe(st.text(max_size=70) | st.just("abc-123")),
                                        "layers": maybe(st.lists(layer, max_size=5)),
                                        "positions": maybe(st.sampled_from(["last", "all", "first"])),
                                        "extra": json_values}))


@SETTINGS
@given(raw=telemetry_objects, internal=st.booleans())
def test_parse_telemetry_accepts_or_names_the_field(raw, internal):
    out = outcome(lambda r: parse_telemetry(r, FACTS, internal=internal), raw, "telemetry")
    if out is not None:
        assert out["sae"] in FACTS.saes and 1 <= out["top_k"] <= 256
        assert set(out) == ({"sae", "top_k", "id"} if internal else {"sae", "top_k"})


@SETTINGS
@given(raw=capture_objects)
def test_parse_capture_accepts_or_names_the_field(raw):
    out = outcome(lambda r: parse_capture(r, FACTS), raw, "capture")
    if out is not None:
        assert out["layers"] and set(out["layers"]) <= FACTS.steerable_layers
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}", out["id"])


DEEP_CASES = {
    "steering.interventions[0].sae": ({"interventions": [{"type": "sae", "sae": deep(5000), "feature": 1,
                                                          "mode": "add", "strength": 1.0}]}, "steering"),
    "steering.interventions[0]": ({"interventions": [deep(5000)]}, "steering"),
    "steering.interventions[0].values[0]": ({"interventions": [{"type": "vector", "layer": 2,
                                                                "values": deep(5000)}]}, "steering"),
    "telemetry.top_k": ({"sae": "s", "top_k": deep(5000)}, "telemetry"),
    "telemetry.sae": ({"sae": deep(5000)}, "telemetry"),
    "capture.id": ({"id": deep(5000), "layers": [1]}, "capture"),
    "capture.positions": ({"id": "a", "layers": [1], "positions": deep(5000)}, "capture"),
}
PARSERS = {"steering": lambda r: parse_steering(r, FACTS), "telemetry": lambda r: parse_telemetry(r, FACTS),
           "capture": lambda r: parse_capture(r, FACTS)}


# Found by this file: these messages echoed the input with {!r}, which raised RecursionError past the
# interpreter's recursion limit; spec.echo bounds the repr.
@pytest.mark.parametrize("field", sorted(DEEP_CASES))
def test_deep_nesting_is_a_named_error(field):
    """Nesting deeper than the interpreter's recursion limit, in fields whose errors echo the input."""
    raw, root = DEEP_CASES[field]
    with pytest.raises(SteeringError) as e:
        PARSERS[root](raw)
    assert e.value.field == field
