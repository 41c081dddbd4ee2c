"""Isolation across the engine's batch mechanics: prefix caching, preemption/recompute, abort,
and bad steering at admission. Reference results come from Hugging Face (tests/reference.py)."""
from __future__ import annotations

import pytest

from tests.engine.conftest import close, make_llm, prompt, run
from tests.reference import hf_greedy

pytestmark = pytest.mark.engine

STEER_B = {"interventions": [{"type": "vector", "vector": "calm", "coef": 4.0}]}
STEER_D = {"interventions": [{"type": "sae", "sae": "relu-l1", "feature": 3, "mode": "add", "strength": 12.0}]}


@pytest.fixture(scope="module")
def llm(artifacts, mode):
    engine = make_llm(artifacts, mode, enable_prefix_caching=True)
    yield engine
    close(engine)


def test_prefix_cache_never_crosses_steering(llm, artifacts):
    """A 128-token shared prefix (4 blocks of 32). Steered prompts get their own cache salt."""
    prefix = prompt(400, 128)
    a, b, c, d = (prefix + prompt(401 + i, 6) for i in range(4))

    def one(p, s):
        from vllm import SamplingParams
        out = llm.generate([{"prompt_token_ids": p}], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                                                                     extra_args=None if s is None else {"steering": s}),
                           use_tqdm=False)[0]
        return out.num_cached_tokens or 0, list(out.outputs[0].token_ids)

    cached_b, tokens_b = one(b, STEER_B)
    cached_a, tokens_a = one(a, None)  # unsteered after a steered request with the same prefix
    cached_c, tokens_c = one(c, STEER_B)  # same steering: may reuse B's blocks
    cached_d, tokens_d = one(d, STEER_D)  # other steering: must not
    cached_a2, _ = one(a, None)  # unsteered reuses unsteered blocks (prefix caching is really on)
    assert cached_b == 0 and cached_a == 0 and cached_d == 0
    assert cached_c >= 96 and cached_a2 >= 96
    for p, s, tokens in ((a, None, tokens_a), (b, STEER_B, tokens_b), (c, STEER_B, tokens_c), (d, STEER_D, tokens_d)):
        assert tokens == hf_greedy(artifacts, p, s, 16)[0]


def test_bad_steering_fails_that_request_and_the_next_is_served(llm, artifacts):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    bad = [({"interventions": [{"type": "sae", "sae": "relu-l1", "feature": 999, "mode": "ablate"}]},
            "steering.interventions[0].feature"),
           ({"interventions": [{"type": "sae", "sae": "nope", "feature": 1, "mode": "ablate"}]},
            "steering.interventions[0].sae"),
           ({"interventions": [{"type": "vector", "layer": 2, "values": [1.0] * 5}]}, "steering.interventions[0].values"),
           ({"interventions": [{"type": "vector", "vector": "calm", "coef": float("nan")}]},
            "steering.interventions[0].coef"),
           ({"interventions": []}, "steering.interventions"),
           ("calm", "steering")]
    p = prompt(500, 10)
    expected = hf_greedy(artifacts, p, STEER_D, 16)[0]
    for steering, field in bad:
        with pytest.raises(VLLMValidationError, match=field.replace("[", r"\[").replace("]", r"\]")):
            llm.generate([{"prompt_token_ids": p}], SamplingParams(max_tokens=4, extra_args={"steering": steering}),
                         use_tqdm=False)
        assert list(run(llm, [p], [STEER_D])[0].token_ids) == expected  # the engine keeps serving


def test_abort_releases_the_slot_and_spares_the_others(llm, artifacts):
    from vllm import SamplingParams
    from sae_steer.vllm_plugin import steering_op
    engine = llm.llm_engine
    prompts = {f"r{i}": prompt(600 + i, 12) for i in range(6)}
    steerings = {"r0": STEER_B, "r1": STEER_D, "r2": None, "r3": STEER_B, "r4": STEER_D, "r5": None}
    for rid, p in prompts.items():
        s = steerings[rid]
        engine.add_request(rid, {"prompt_token_ids": p},
                           SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                                          extra_args=None if s is None else {"steering": s}))
    done = {}
    for step in range(200):
        if step == 3:
            engine.abort_request(["r1", "r3"])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        if not engine.has_unfinished_requests():
            break
    for rid in ("r0", "r2", "r4", "r5"):
        assert done[rid] == hf_greedy(artifacts, prompts[rid], steerings[rid], 16)[0], rid
    assert len(done.get("r1", [])) < 16 and len(done.get("r3", [])) < 16
    run(llm, [prompt(601, 4)], [None], max_tokens=2)
    assert not steering_op._table.rows.live, "aborted and finished requests release their slots"
