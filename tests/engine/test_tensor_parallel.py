"""Tensor parallelism: every rank holds the full residual stream after the all-reduce and applies
the same edit from its own SteeringTable. TP=2 on the CPU build, steered == Hugging Face."""
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
STEERINGS = [None, {"interventions": [{"type": "vector", "vector": "calm", "coef": 4.0}]},
             {"interventions": [{"type": "sae", "sae": "relu-l1", "feature": 3, "mode": "add", "strength": 12.0},
                                {"type": "sae", "sae": "jump-l2", "feature": 5, "mode": "clamp", "value": 9.0}]}]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 on CPU binds one core per rank")
def test_tensor_parallel_2_steers_like_the_reference(artifacts, tmp_path):
    prompts = [prompt(900 + i, 10 + 3 * i) for i in range(len(STEERINGS))]
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    json.dump({"model": str(artifacts.model), "settings": artifacts.settings, "prompts": prompts,
               "steerings": STEERINGS, "max_tokens": 12}, open(spec, "w"))
    # One NUMA node here: vLLM cannot auto-bind two CPU workers, so each rank gets one core.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("tp_job.py")), str(spec), str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    for p, s, tokens in zip(prompts, STEERINGS, json.load(open(out))):
        assert tokens == hf_greedy(artifacts, p, s, 12)[0], s
