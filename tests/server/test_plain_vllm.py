"""Plain vLLM serving (`python -m vllm.entrypoints.openai.api_server --additional-config ...`) with
VLLM_PLUGINS unset: the general plugin loads but the endpoint plugin does not (vLLM loads endpoint
plugins only when VLLM_PLUGINS names them). A `steering` field must then fail with 400, never be
served unsteered."""
from __future__ import annotations

import json
import os
import sys

import pytest
import requests

from tests.server.conftest import Server

pytestmark = [pytest.mark.engine, pytest.mark.multiprocess]


def test_steering_without_the_http_endpoints_is_refused_not_ignored(artifacts, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(artifacts.model),
            "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "512", "--block-size", "32",
            "--enforce-eager", "--additional-config", json.dumps({"sae_steer": artifacts.settings})]
    server = Server(argv, tmp_path / "plain.log", env=env)
    try:
        steering = {"interventions": [{"type": "vector", "vector": "calm", "coef": 4.0}]}
        for path, base in (("/v1/completions", {"prompt": "hello"}), ("/v1/chat/completions",
                                                                      {"messages": [{"role": "user", "content": "hi"}]})):
            r = requests.post(server.url + path, timeout=60,
                              json={"model": "tiny", "max_tokens": 2, "steering": steering, **base})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "steering" and "VLLM_PLUGINS" in r.json()["error"]["message"]
            for key in ("sae_steer_capture", "sae_steer_telemetry", "steering"):  # internal keys, endpoints off
                r = requests.post(server.url + path, timeout=60,
                                  json={"model": "tiny", "max_tokens": 2, "vllm_xargs": {key: "x"}, **base})
                assert r.status_code == 400 and r.json()["error"]["param"] == f"vllm_xargs.{key}", r.text
            plain = requests.post(server.url + path, timeout=60, json={"model": "tiny", "max_tokens": 2, **base})
            assert plain.status_code == 200, plain.text
        assert requests.get(server.url + "/v1/steering/saes", timeout=30).status_code == 404
    finally:
        server.stop()
