"""Preemption: a KV cache too small for the batch makes vLLM evict requests and recompute them
later; a recomputed steered request must be steered again, and exactly as before."""
from __future__ import annotations

import pytest

from tests.engine.conftest import close, make_llm, prompt, run
from tests.reference import hf_greedy

pytestmark = pytest.mark.engine

STEERINGS = [None, {"interventions": [{"type": "vector", "vector": "calm", "coef": 4.0}]},
             {"interventions": [{"type": "sae", "sae": "relu-l1", "feature": 3, "mode": "add", "strength": 12.0}]},
             {"interventions": [{"type": "sae", "sae": "jump-l2", "feature": 5, "mode": "clamp", "value": 9.0}],
              "positions": "generated"}] * 2


def test_preempted_requests_recompute_with_their_steering(artifacts):
    # 8 requests x (40 prompt + 40 generated) tokens need 8 x 3 blocks of 32; give the engine 12.
    llm = make_llm(artifacts, "eager", num_gpu_blocks_override=12, max_model_len=128, disable_log_stats=False,
                   enable_prefix_caching=False)
    try:
        prompts = [prompt(700 + i, 40) for i in range(len(STEERINGS))]
        outs = run(llm, prompts, STEERINGS, max_tokens=40, logprobs=0)
        preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    finally:
        close(llm)
    assert preemptions > 0, "the KV cache was meant to be too small: no preemption happened"
    for p, s, out in zip(prompts, STEERINGS, outs):
        assert list(out.token_ids) == hf_greedy(artifacts, p, s, 40)[0]
