"""Serving is multiprocess: the engine core and the worker run in their own processes, and the
plugin reaches them only through entry points and the request's extra_args. Compiled mode (the
default users run). Unsteered requests must be bit-identical to vLLM without the plugin."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.conftest import prompt
from tests.reference import hf_greedy

pytestmark = [pytest.mark.engine, pytest.mark.multiprocess]
JOB = Path(__file__).with_name("mp_job.py")
MAX_TOKENS = 16
REQUESTS = [
    {"name": "plain-1", "prompt": prompt(800, 14), "steering": None},
    {"name": "caa", "prompt": prompt(801, 9), "steering": {"interventions": [
        {"type": "vector", "vector": "calm", "coef": 4.0}]}},
    {"name": "plain-2", "prompt": prompt(802, 30), "steering": None},
    {"name": "sae", "prompt": prompt(803, 20), "steering": {"interventions": [
        {"type": "sae", "sae": "relu-l1", "feature": 3, "mode": "add", "strength": 12.0},
        {"type": "sae", "sae": "jump-l2", "feature": 5, "mode": "clamp", "value": 9.0}]}},
    {"name": "plain-3", "prompt": prompt(804, 5), "steering": None},
]


def run_job(kind: str, artifacts, tmp_path: Path) -> dict:
    spec = tmp_path / f"{kind}-spec.json"
    out = tmp_path / f"{kind}-out.json"
    settings = {**artifacts.settings, "layers": "all"}  # the op at every layer: the hardest case for bit-identity
    json.dump({"model": str(artifacts.model), "settings": settings, "requests": REQUESTS,
               "max_tokens": MAX_TOKENS}, open(spec, "w"))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_WORKER_MULTIPROC_METHOD": "fork"}
    if kind == "vanilla":
        env["VLLM_PLUGINS"] = ""
    else:
        env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([sys.executable, str(JOB), kind, str(spec), str(out)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.load(open(out))


@pytest.fixture(scope="module")
def results(artifacts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    return {kind: run_job(kind, artifacts, tmp) for kind in ("vanilla", "plugin")}


def test_unsteered_requests_are_bit_identical_to_vanilla_vllm(results):
    assert not results["vanilla"]["plugin_loaded_in_api_process"], "the vanilla run must not load the general plugin"
    assert results["plugin"]["plugin_loaded_in_api_process"]
    plugin = {o["name"]: o for o in results["plugin"]["outputs"]}
    for vanilla in results["vanilla"]["outputs"]:
        ours = plugin[vanilla["name"]]
        assert ours["token_ids"] == vanilla["token_ids"], vanilla["name"]
        assert ours["logprobs"] == vanilla["logprobs"], vanilla["name"]  # exact floats, every step


def test_steered_requests_match_hugging_face_across_processes(results, artifacts):
    plugin = {o["name"]: o for o in results["plugin"]["outputs"]}
    for r in REQUESTS:
        if r["steering"] is not None:
            tokens, _ = hf_greedy(artifacts, r["prompt"], r["steering"], MAX_TOKENS)
            assert plugin[r["name"]]["token_ids"] == tokens, r["name"]
            assert tokens != hf_greedy(artifacts, r["prompt"], None, MAX_TOKENS)[0], "steering changes the output"
