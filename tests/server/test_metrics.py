"""sae-steer's series on vLLM's own /metrics of a real `sae-steer serve`: counters move by exactly what the
requests sent here did, the slot gauges show what the worker's tables hold while streams are open (requests
with equal steering share a slot) and drop back when they end, and the info series describe the configured
SAEs, vectors and layers. Parsed with prometheus_client's text parser.

The server is this module's own, with vLLM's dev routes on (VLLM_SERVER_DEV_MODE): the tiny model generates
hundreds of tokens in a fraction of a second, so the slot test pauses the engine (POST /pause?mode=keep,
which stops stepping and keeps the requests in the batch) to read the gauges with the streams held in the
worker, and checks by vLLM's own running count that they were held."""
from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import ADMIN_KEY, Server, serve_args

pytestmark = [pytest.mark.engine, pytest.mark.multiprocess]
ADMIN = {"X-Steering-Admin-Key": ADMIN_KEY}
MODEL = "tiny"  # serve_args' --served-model-name
CONTEXT = 2048  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics-server")
    args = serve_args(artifacts, tmp / "vectors")
    args[args.index("--max-model-len") + 1] = str(CONTEXT)  # long streams: the pause lands while they run
    srv = Server(args, tmp / "server.log", env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"})
    yield srv
    srv.stop()


def scrape(server) -> dict:
    r = requests.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(got: dict, name: str, **labels) -> float:
    """A series' value; a labelled counter that was never incremented has no series yet: 0."""
    return got.get((name, tuple(sorted({"model_name": MODEL, **labels}.items()))), 0.0)


def sae(name, feature, mode, **kw):
    return {"type": "sae", "sae": name, "feature": feature, "mode": mode, **kw}


def complete(server, steering=None, chat=False):
    body = {"model": MODEL, "max_tokens": 3, "temperature": 0.0}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "The licensee shall"})
    if steering is not None:
        body["steering"] = steering
    return requests.post(server.url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body,
                         timeout=120)


PAIRS = [{"positive": "I am calm (A", "negative": "I am angry (B"},
         {"positive": "Stay calm (A", "negative": "Shout now (B"}]


def test_counters_move_by_what_the_requests_did(server):
    before = scrape(server)
    ok = [complete(server, {"interventions": [sae("relu-l1", 3, "add", strength=8.0)]}),
          complete(server, {"interventions": [sae("gated-l1", 7, "scale", factor=2.0),
                                              {"type": "vector", "vector": "early", "coef": -1.0}]}),
          # two clamps, one request: counted once
          complete(server, {"interventions": [sae("jump-l2", 5, "clamp", value=3.0), sae("jump-l2", 6, "clamp",
                                                                                        value=1.0)]}),
          complete(server, {"interventions": [{"type": "logit", "sae": "relu-l1", "feature": 3, "strength": 2.0}]}),
          complete(server, {"interventions": [{"type": "vector", "vector": "calm", "coef": 2.0}]}, chat=True),
          # compare runs the request twice (steered, unsteered): one steered request
          complete(server, {"interventions": [sae("relu-l1", 4, "ablate")], "compare": True}),
          complete(server, {"telemetry": {"sae": "relu-l1", "top_k": 3}})]  # telemetry alone: not steered
    assert [r.status_code for r in ok] == [200] * len(ok), [r.text for r in ok if r.status_code != 200]
    bad = [  # (response, the error's param, the refusal's field label: list indices dropped, telemetry alike)
        (complete(server, {"interventions": [sae("no-such-sae", 1, "add", strength=1.0)]}),
         "steering.interventions[0].sae", "steering.interventions.sae"),
        (complete(server, {"interventions": [sae("relu-l1", 10**6, "add", strength=1.0)]}),
         "steering.interventions[0].feature", "steering.interventions.feature"),
        (complete(server, {"interventions": [sae("relu-l1", 10**6, "add", strength=1.0)]}, chat=True),
         "steering.interventions[0].feature", "steering.interventions.feature"),
        (complete(server, {"interventions": [sae("relu-l1", 1, "add", strength=1.0)],
                           "telemetry": {"sae": "relu-l1", "top_k": 0}}), "steering.telemetry.top_k", "telemetry.top_k")]
    for r, param, _ in bad:
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    built = requests.post(server.url + "/v1/steering/vectors", headers=ADMIN, timeout=300,
                          json={"name": "metrics-calm", "pairs": PAIRS, "layers": [2], "overwrite": True})
    assert built.status_code == 201, built.text
    steered_by_built = complete(server, {"interventions": [{"type": "vector", "vector": "metrics-calm"}]})
    assert steered_by_built.status_code == 200, steered_by_built.text
    refused_build = requests.post(server.url + "/v1/steering/vectors", headers=ADMIN, timeout=60,
                                  json={"name": "metrics-bad", "pairs": PAIRS, "layers": [99]})
    assert refused_build.status_code == 400
    captured = requests.post(server.url + "/v1/steering/captures", headers=ADMIN, timeout=300, json={
        "name": "metrics-capture", "texts": ["The cold winter came", "A river ran by"], "layers": [2],
        "overwrite": True})
    assert captured.status_code == 201, captured.text
    wrong_key = requests.post(server.url + "/v1/steering/captures", headers={"X-Steering-Admin-Key": "wrong"},
                              timeout=60, json={"name": "x", "texts": ["a b c"], "layers": [2]})
    assert wrong_key.status_code == 401
    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    steered = "vllm:sae_steer_requests_steered_total"
    assert {kind: delta(steered, intervention_type=kind) for kind in
            ("sae_add", "sae_clamp", "sae_ablate", "sae_scale", "vector", "logit")} == {
        "sae_add": 1, "sae_clamp": 1, "sae_ablate": 1, "sae_scale": 1, "vector": 3, "logit": 1}
    refused = "vllm:sae_steer_requests_refused_total"
    expected = Counter(label for *_, label in bad)
    assert {label: delta(refused, field=label) for label in expected} == expected
    assert {o: delta("vllm:sae_steer_caa_builds_total", outcome=o) for o in ("succeeded", "failed", "refused")} \
        == {"succeeded": 1, "failed": 0, "refused": 1}
    assert {o: delta("vllm:sae_steer_captures_total", outcome=o) for o in ("succeeded", "failed", "refused")} \
        == {"succeeded": 1, "failed": 0, "refused": 0}
    assert value(after, "vllm:sae_steer_caa_builds_running") == value(after, "vllm:sae_steer_captures_running") == 0
    assert delta("vllm:sae_steer_admin_requests_refused_total", reason="unauthorized") == 1
    assert delta("vllm:sae_steer_admin_requests_refused_total", reason="disabled") == 0
    # the same endpoint as vLLM's own series, with the same model_name label
    assert any(name == "vllm:num_requests_running" and dict(labels).get("model_name") == MODEL
               for name, labels in after)


def open_stream(server, steering):
    """A long streamed completion, read up to its first chunk (so it is running in the engine) -> (the response,
    its line iterator: dropping the iterator would close the connection, and the server would abort it)."""
    r = requests.post(server.url + "/v1/completions", stream=True, timeout=120, json={
        "model": MODEL, "prompt": "The licensee shall", "max_tokens": CONTEXT - 16, "ignore_eos": True,
        "temperature": 0.0, "stream": True, "steering": steering})
    assert r.status_code == 200, r.text
    lines = r.iter_lines()
    assert next(lines).startswith(b"data:")
    return r, lines


def slots(got: dict, table: str) -> tuple[float, float]:
    return (value(got, "vllm:sae_steer_slots_in_use", table=table),
            value(got, "vllm:sae_steer_slots_limit", table=table))


def running(got: dict) -> float:
    """vLLM's own count of the requests its engine ran in its last step."""
    return sum(v for (name, _), v in got.items() if name == "vllm:num_requests_running")


def test_slot_gauges_show_the_workers_tables(server):
    shared = {"interventions": [sae("relu-l1", 3, "add", strength=8.0)]}
    other = {"interventions": [{"type": "vector", "vector": "calm", "coef": 2.0},
                               {"type": "logit", "sae": "relu-l1", "feature": 3, "strength": 2.0}]}
    for attempt in range(3):  # bounded; another attempt only when a stream ended before the pause took hold
        with ThreadPoolExecutor(3) as pool:
            streams = list(pool.map(lambda s: open_stream(server, s), [shared, shared, other]))
        assert requests.post(server.url + "/pause", params={"mode": "keep"}, timeout=60).status_code == 200
        try:
            got = scrape(server)  # while paused, the worker's table and vLLM's last step stats stand still
        finally:
            assert requests.post(server.url + "/resume", timeout=60).status_code == 200
            for r, _ in streams:
                r.close()  # the server aborts them
        if running(got) == 3:
            break
    assert running(got) == 3, "the streams never ran together when the engine paused"
    # two requests with equal steering share a slot; the third's residual part takes another, its logit part a
    # logit slot; each table has --max-num-seqs slots
    assert slots(got, "residual") == (2, 32)
    assert slots(got, "logit") == (1, 32)
    for _ in range(120):  # bounded: the worker frees the slots at its next step
        if slots(got := scrape(server), "residual")[0] == 0:
            break
        time.sleep(0.5)
    assert slots(got, "residual") == (0, 32) and slots(got, "logit") == (0, 32)


def test_info_series_describe_the_configured_steering(server):
    got = scrape(server)
    listed = requests.get(server.url + "/v1/steering/saes", timeout=30).json()["data"]
    assert listed
    for s in listed:
        assert value(got, "vllm:sae_steer_sae_info", sae=s["name"], layer=str(s["layer"]),
                     architecture=s["architecture"], d_sae=str(s["d_sae"])) == 1
    vectors = [v for v in requests.get(server.url + "/v1/steering/vectors", timeout=30).json()["data"]
               if v["source"] == "config"]
    assert {v["name"] for v in vectors} == {"calm", "early"}
    for v in vectors:
        assert value(got, "vllm:sae_steer_vector_info", vector=v["name"], layers=",".join(map(str, v["layers"]))) == 1
    # steerable: every SAE's and config vector's layer, plus the fixture's --steering-layers 2
    steerable = sorted({s["layer"] for s in listed} | {L for v in vectors for L in v["layers"]} | {2})
    configs = [dict(labels) for name, labels in got if name == "vllm:sae_steer_config_info"]
    assert [c["steerable_layers"] for c in configs] == [",".join(map(str, steerable))]
    assert len([k for k in got if k[0] == "vllm:sae_steer_sae_info"]) == len(listed)  # one series per SAE
