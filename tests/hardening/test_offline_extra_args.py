"""Offline, every value the plugin reads from `SamplingParams.extra_args` is checked at admission: a
malformed telemetry / capture / steering object fails its own request (VLLMValidationError naming the
field) and never reaches the model's op; the engine keeps serving the next request."""
from __future__ import annotations

import os
import stat

import pytest

from tests.engine.conftest import close, make_llm, prompt

pytestmark = pytest.mark.engine
ID = "0123abcd" * 4
T, C = "sae_steer_telemetry", "sae_steer_capture"

BAD = [
    ({T: {"sae": "jump-l2", "top_k": 3}}, f"{T}.id"),  # no id: a KeyError inside the op before
    ({T: {"sae": "jump-l2", "top_k": 3, "id": "../../../tmp/x"}}, f"{T}.id"),
    ({T: {"sae": "jump-l2", "top_k": 3, "id": 7}}, f"{T}.id"),
    ({T: {"sae": "nope", "top_k": 3, "id": ID}}, f"{T}.sae"),
    ({T: {"sae": "jump-l2", "top_k": "3", "id": ID}}, f"{T}.top_k"),
    ({T: {"sae": "jump-l2", "top_k": 10**9, "id": ID}}, f"{T}.top_k"),
    ({T: "x"}, T),
    ({T: ["jump-l2"]}, T),
    ({C: "x"}, C),  # HTTP 500 when it came through vllm_xargs
    ({C: {"layers": [2]}}, f"{C}.id"),
    ({C: {"id": ID, "layers": [9]}}, f"{C}.layers[0]"),
    ({C: {"id": ID, "layers": "2"}}, f"{C}.layers"),
    ({C: {"id": ID, "layers": [2], "path": "/etc"}}, f"{C}.path"),
    ({C: {"id": "a/b", "layers": [2]}}, f"{C}.id"),
    ({"sae_steer_colour": "red"}, "sae_steer_colour"),
    ({"steering": "calm"}, "steering"),
    ({"steering": {"interventions": [{"type": "vector", "layer": 2, "values": [float("nan")] * 128}]}},
     "steering.interventions[0].values[0]"),
]


@pytest.fixture(scope="module")
def llm(artifacts, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "sae-steer"
    old = os.environ.get("SAE_STEER_RUNTIME_DIR")
    os.environ["SAE_STEER_RUNTIME_DIR"] = str(run_dir)
    engine = make_llm(artifacts, "eager")
    yield engine, run_dir
    close(engine)
    if old is None:
        os.environ.pop("SAE_STEER_RUNTIME_DIR")
    else:
        os.environ["SAE_STEER_RUNTIME_DIR"] = old


def generate(engine, extra_args, max_tokens=4):
    from vllm import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra_args)
    return list(engine.generate([{"prompt_token_ids": prompt(1, 12)}], params, use_tqdm=False)[0].outputs[0].token_ids)


def test_malformed_extra_args_fail_alone_and_the_engine_keeps_serving(llm):
    from vllm.exceptions import VLLMValidationError
    engine, _ = llm
    baseline = generate(engine, None)
    for extra, field in BAD:
        with pytest.raises(VLLMValidationError) as e:
            generate(engine, extra)
        assert e.value.parameter == field and str(e.value).startswith(field), (extra, str(e.value))
        assert generate(engine, None) == baseline, f"the engine still serves after {extra}"
    assert generate(engine, {"steering": None, T: None}) == baseline, "None is absent"


def test_a_good_telemetry_object_is_served_offline(llm):
    """The internal object is usable offline once valid: one record per generated token, in a private dir."""
    engine, run_dir = llm
    from sae_steer.vllm_plugin import observers
    tokens = generate(engine, {T: {"sae": "jump-l2", "top_k": 3, "id": ID}}, max_tokens=5)
    assert len(tokens) == 5
    assert stat.S_IMODE(os.lstat(run_dir).st_mode) == 0o700
    records = observers.TelemetryReader(ID).new_records()
    assert [i for i, _ in records] == list(range(5)) and all(len(r["features"]) == 3 for _, r in records)
    observers.discard(ID)
    assert not list(run_dir.iterdir())


def test_a_prepared_runtime_directory_fails_observing_requests_at_admission(llm, tmp_path, monkeypatch):
    from vllm.exceptions import VLLMValidationError
    engine, _ = llm
    bad = tmp_path / "open"
    bad.mkdir()
    bad.chmod(0o777)
    monkeypatch.setenv("SAE_STEER_RUNTIME_DIR", str(bad))
    with pytest.raises(VLLMValidationError) as e:
        generate(engine, {C: {"id": ID, "layers": [2]}})
    assert e.value.parameter == C and "mode 0777" in str(e.value)
    assert list(bad.iterdir()) == []
    assert len(generate(engine, None)) == 4


def test_steering_is_parsed_once_in_the_front_end_and_once_in_the_worker(llm, monkeypatch):
    """In-process, the front end and the worker share this process: one request's steering is validated by
    pydantic exactly twice, once at admission (the caller's object, left as it was) and once in the worker
    (from the plain data the front end sent). An already admitted Steering (what the HTTP server hands vLLM)
    is not parsed again at admission: once, in the worker."""
    import copy

    from vllm import SamplingParams

    from sae_steer import spec
    from sae_steer.vllm_plugin import facts
    engine, _ = llm
    seen = []
    validate = spec.Steering.model_validate.__func__

    def counting(cls, obj, *args, **kwargs):
        seen.append(obj)
        return validate(cls, obj, *args, **kwargs)

    monkeypatch.setattr(spec.Steering, "model_validate", classmethod(counting))
    raw = {"interventions": [{"type": "sae", "sae": "jump-l2", "feature": 3, "mode": "add", "strength": 8.0},
                             {"type": "vector", "vector": "calm", "coef": 2.0}]}
    before = copy.deepcopy(raw)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, extra_args={"steering": raw})
    tokens = [o.outputs[0].token_ids for o in engine.generate([{"prompt_token_ids": prompt(1, 12)}], params,
                                                               use_tqdm=False)]
    assert len(seen) == 2, seen
    assert seen[0] == before and params.extra_args["steering"] is raw and raw == before
    # the worker's input: plain data, with the values written out ("coef" of the named vector kept as given)
    assert seen[1] is not raw and seen[1] == {"interventions": [
        {"type": "sae", "sae": "jump-l2", "feature": 3, "mode": "add", "strength": 8.0},
        {"type": "vector", "vector": "calm", "coef": 2.0}], "positions": "all"}

    seen.clear()
    admitted = spec.Admitted(spec.parse_steering(raw, facts.current()), facts.current())
    seen.clear()
    again = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, extra_args={"steering": admitted})
    assert [o.outputs[0].token_ids for o in engine.generate([{"prompt_token_ids": prompt(1, 12)}], again,
                                                             use_tqdm=False)] == tokens
    assert len(seen) == 1 and isinstance(seen[0], dict), seen
    assert tokens[0] != generate(engine, None), "the steering changed the tokens (or this test proves nothing)"
