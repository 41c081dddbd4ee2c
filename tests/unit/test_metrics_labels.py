"""sae-steer's Prometheus metrics without a server: the bounded label sets (every field a real steering
error names maps to one of them), the series a fresh registry exposes, the worker's slot file (published,
read, a dead worker's file removed), and several API processes collected through PROMETHEUS_MULTIPROC_DIR."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from sae_steer.server import metrics
from sae_steer.registry import Registry
from sae_steer.spec import ModelFacts, SaeFacts, Steering, SteeringError, parse_steering, parse_telemetry
from sae_steer.vllm_plugin import slot_stats
from sae_steer.vllm_plugin.logit_bias import LogitBias
from sae_steer.vllm_plugin.table import SteeringTable

FACTS = ModelFacts(d_model=4, num_layers=3, steerable_layers=frozenset({1, 2}),
                   saes={"s": SaeFacts(d_sae=8, layer=1, architecture="relu", d_model=4)},
                   vectors={"v": frozenset({2, 1})}, max_interventions=5)


def sae(**kw):
    return {"type": "sae", "sae": "s", "feature": 1, "mode": "add", "strength": 1.0, **kw}


@pytest.mark.parametrize("steering,label", [
    ({"interventions": [sae(sae="nope")]}, "steering.interventions.sae"),
    ({"interventions": [sae(), sae(feature=99)]}, "steering.interventions.feature"),
    ({"interventions": [sae(when={"feature": 99})]}, "steering.interventions.when.feature"),
    ({"interventions": [sae(strength=1e9)]}, "steering.interventions.strength"),
    ({"interventions": [sae(mode="clamp", strength=None, value=float("nan"))]}, "steering.interventions.value"),
    ({"interventions": [{"type": "vector", "vector": "w"}]}, "steering.interventions.vector"),
    ({"interventions": [{"type": "vector", "layer": 0, "values": [0.0] * 4}]}, "steering.interventions.layer"),
    ({"interventions": [{"type": "vector", "layer": 1, "values": [0.0, 1e9, 0.0, 0.0]}]},
     "steering.interventions.values"),
    ({"interventions": [{"type": "logit", "sae": "s", "feature": 8, "strength": 1.0}]},
     "steering.interventions.feature"),
    ({"interventions": [sae()] * 6}, "steering.interventions"),
    ({"interventions": [sae(my_own_key=1)]}, "steering.interventions"),  # a key the client made up
    ({"interventions": [sae(mode="shout")]}, "steering.interventions.mode"),
    ({"interventions": [{"type": "warp"}]}, "steering.interventions"),
    ({"interventions": [sae()], "positions": "later"}, "steering.positions"),
    ({"interventions": [sae()], "whatever": 1}, "steering"),
    ("not an object", "steering"),
])
def test_each_steering_error_maps_to_its_fields_label(steering, label):
    with pytest.raises(SteeringError) as e:
        parse_steering(steering, FACTS)
    assert metrics.refusal_field(e.value.field) == label
    assert label in metrics.REFUSAL_FIELDS


@pytest.mark.parametrize("telemetry,where,label", [
    ({"sae": "nope"}, "telemetry", "telemetry.sae"),
    ({"sae": "s", "top_k": 0}, "steering.telemetry", "telemetry.top_k"),  # given inside `steering`
    ({"sae": "s", "client_text": 1}, "steering.telemetry", "telemetry"),
])
def test_telemetry_errors_are_labelled_alike_inside_steering_or_at_the_top_level(telemetry, where, label):
    with pytest.raises(SteeringError) as e:
        parse_telemetry(telemetry, FACTS, where)
    assert metrics.refusal_field(e.value.field) == label


def test_labels_never_carry_client_text():
    assert metrics.refusal_field("vllm_xargs.sae_steer_anything_at_all") == "vllm_xargs"
    assert metrics.refusal_field("steering.compare") == metrics.refusal_field("compare") == "compare"
    assert metrics.refusal_field("something.else[3]") == "other"


def test_intervention_types_name_sae_modes_vectors_and_logit_steering():
    steering = parse_steering({"interventions": [
        sae(), sae(feature=2), sae(mode="scale", strength=None, factor=2.0), {"type": "vector", "vector": "v"},
        {"type": "logit", "sae": "s", "feature": 3, "strength": 2.0}]}, FACTS)
    assert metrics.intervention_types(steering) == {"sae_add", "sae_scale", "vector", "logit"}
    assert metrics.intervention_types(steering) <= set(metrics.INTERVENTION_TYPES)
    assert {"sae_clamp", "sae_ablate"} <= set(metrics.INTERVENTION_TYPES)


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_fresh_registry_exposes_zeroed_counters_and_the_served_settings():
    registry = CollectorRegistry()
    metrics.SteeringMetrics("m", FACTS, registry)
    got = samples(generate_latest(registry).decode())
    assert got[("vllm:sae_steer_requests_steered_total",
                (("intervention_type", "sae_clamp"), ("model_name", "m")))] == 0
    assert got[("vllm:sae_steer_caa_builds_total", (("model_name", "m"), ("outcome", "failed")))] == 0
    assert got[("vllm:sae_steer_sae_info", (("architecture", "relu"), ("d_sae", "8"), ("layer", "1"),
                                            ("model_name", "m"), ("sae", "s")))] == 1
    assert got[("vllm:sae_steer_vector_info", (("layers", "1,2"), ("model_name", "m"), ("vector", "v")))] == 1
    assert got[("vllm:sae_steer_config_info", (("max_abs_value", "10000"), ("max_interventions", "5"),
                                               ("model_name", "m"), ("steerable_layers", "1,2")))] == 1
    assert not [k for k in got if k[0].startswith("vllm:sae_steer_slots")]  # nothing published yet


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    path = tmp_path / "runtime"
    monkeypatch.setenv("SAE_STEER_RUNTIME_DIR", str(path))
    monkeypatch.setenv("VLLM_PLUGINS", "other,sae_steer")
    monkeypatch.setattr(slot_stats, "_publisher", None)
    monkeypatch.setattr(slot_stats, "_disabled", False)
    yield path
    if slot_stats._publisher is not None:
        os.close(slot_stats._publisher.fd)  # releases the lock: this "worker" is gone


def tables(n_rows: int, logit: bool):
    """A real SteeringTable (one vector at layer 1) and LogitBias, with n_rows batch rows."""
    table = SteeringTable(Registry(saes={}, vectors={"v": {1: torch.ones(4)}}), [1], max_rows=n_rows, max_tokens=16,
                          max_edits=2, d_model=4, device=torch.device("cpu"))
    return table, LogitBias(n_rows, 5, "cpu") if logit else None


def vector(coef: float) -> Steering:
    return Steering.model_validate({"interventions": [{"type": "vector", "vector": "v", "coef": coef}]})


def test_a_worker_publishes_its_slots_and_a_dead_workers_file_is_removed(runtime_dir):
    table, bias = tables(6, logit=True)
    # rows 0, 1 share a steering, row 2 has another: two slots; one logit slot
    table.update([(0, vector(1.0), 3), (1, vector(1.0), 3), (2, vector(2.0), 3)], [], [])
    bias.update([(0, ("s", 1, 2.0))], [], [], lambda key: torch.zeros(5))
    slot_stats.publish(table, bias)
    assert slot_stats.read_published() == [(2, 6, 1, 6)]
    table.update([], [0, 2], [])
    slot_stats.publish(table, bias)
    assert slot_stats.read_published() == [(1, 6, 1, 6)]
    dead = runtime_dir / f"{slot_stats.PREFIX}999999"  # left by an earlier server's worker: nobody locks it
    dead.write_bytes(slot_stats._RECORD.pack(5, 6, 0, 6))
    assert slot_stats.read_published() == [(1, 6, 1, 6)]
    assert not dead.exists()
    registry = CollectorRegistry()
    m = metrics.SteeringMetrics("m", FACTS, registry)
    m.refresh_slots()
    got = samples(generate_latest(registry).decode())
    assert got[("vllm:sae_steer_slots_in_use", (("model_name", "m"), ("table", "residual")))] == 1
    assert got[("vllm:sae_steer_slots_limit", (("model_name", "m"), ("table", "logit")))] == 6


def test_offline_engines_publish_nothing(runtime_dir, monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS")
    slot_stats.publish(*tables(4, logit=False))
    assert not runtime_dir.exists() or not [p for p in runtime_dir.iterdir() if p.name.startswith(slot_stats.PREFIX)]


def test_several_api_processes_are_summed_through_the_multiprocess_directory(tmp_path, runtime_dir):
    """vLLM with --api-server-count > 1 collects every process's values from PROMETHEUS_MULTIPROC_DIR; the slot
    gauges are what the process answering the scrape read from the workers just before."""
    table, _ = tables(6, logit=False)
    table.update([(0, vector(1.0), 3)], [], [])
    slot_stats.publish(table, None)  # this process plays the worker
    script = ("import sys\n"
              "from sae_steer.server import metrics\n"
              "from sae_steer.spec import Admitted, parse_steering\n"
              "from tests.unit.test_metrics_labels import FACTS, sae\n"
              "metrics._metrics = metrics.SteeringMetrics('m', FACTS)\n"
              "steering = Admitted(parse_steering({'interventions': [sae()]}, FACTS), FACTS)\n"
              "for _ in range(int(sys.argv[1])):\n"
              "    metrics.record_steered(steering)\n"
              "metrics.record_refused('steering.interventions[1].sae')\n"
              "metrics._metrics.refresh_slots()\n")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus")}
    (tmp_path / "prometheus").mkdir()
    for n in (2, 3):  # two API server processes
        subprocess.run([sys.executable, "-c", script, str(n)], env=env, check=True, cwd=os.getcwd())
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path / "prometheus"))
    got = samples(generate_latest(registry).decode())
    assert got[("vllm:sae_steer_requests_steered_total", (("intervention_type", "sae_add"), ("model_name", "m")))] == 5
    assert got[("vllm:sae_steer_requests_refused_total",
                (("field", "steering.interventions.sae"), ("model_name", "m")))] == 2
    assert got[("vllm:sae_steer_sae_info", (("architecture", "relu"), ("d_sae", "8"), ("layer", "1"),
                                            ("model_name", "m"), ("sae", "s")))] == 1
    assert got[("vllm:sae_steer_slots_in_use", (("model_name", "m"), ("table", "residual")))] == 1
    assert got[("vllm:sae_steer_slots_limit", (("model_name", "m"), ("table", "residual")))] == 6
    assert not [k for k in got if k[0] == "vllm:sae_steer_slots_in_use" and ("table", "logit") in k[1]]


def test_an_admin_routes_outcome_is_read_from_what_it_answers(monkeypatch):
    import asyncio
    from fastapi.responses import JSONResponse
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_metrics", metrics.SteeringMetrics("m", FACTS, registry))

    @metrics.counted("captures")
    async def route(answer):
        if isinstance(answer, Exception):
            raise answer
        return answer

    for answer in ({"name": "done"}, JSONResponse({}, status_code=201), JSONResponse({}, status_code=409),
                   JSONResponse({}, status_code=503), RuntimeError("disk full")):
        try:
            asyncio.run(route(answer))
        except RuntimeError:
            pass
    got = samples(generate_latest(registry).decode())
    assert {o: got[("vllm:sae_steer_captures_total", (("model_name", "m"), ("outcome", o)))] for o in metrics.OUTCOMES} \
        == {"succeeded": 2, "failed": 2, "refused": 1}
    assert got[("vllm:sae_steer_captures_running", (("model_name", "m"),))] == 0
    assert got[("vllm:sae_steer_caa_builds_total", (("model_name", "m"), ("outcome", "failed")))] == 0
