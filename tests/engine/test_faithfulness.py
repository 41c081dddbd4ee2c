"""vLLM (eager and compiled) steered with the plugin == Hugging Face + forward hooks doing the
reference math, token for token; and a batch of distinct steerings == each request alone."""
from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import MAX_TOKENS, close, first_logprobs, make_llm, prompt, run
from tests.reference import hf_greedy

pytestmark = pytest.mark.engine

LOGPROB_ATOL = 2e-3  # float32 engine vs float32 HF: seen ~1e-5; a wrong edit moves them by >1e-1


def sae(name, feature, mode, **kw):
    return {"type": "sae", "sae": name, "feature": feature, "mode": mode, **kw}


INLINE = torch.randn(128, generator=torch.Generator().manual_seed(3)).tolist()
CASES = {
    "unsteered": None,
    "caa": {"interventions": [{"type": "vector", "vector": "calm", "coef": 4.0}]},
    "caa-layer0": {"interventions": [{"type": "vector", "vector": "early", "coef": -3.0}]},
    "inline-vector": {"interventions": [{"type": "vector", "layer": 2, "values": INLINE, "coef": 3.0}]},
    "relu-add": {"interventions": [sae("relu-l1", 3, "add", strength=12.0)]},
    "relu-clamp": {"interventions": [sae("relu-l1", 10, "clamp", value=15.0)]},
    "relu-ablate": {"interventions": [sae("relu-l1", f, "ablate") for f in range(0, 256, 4)]},
    "gated-scale": {"interventions": [sae("gated-l1", f, "scale", factor=6.0) for f in range(32)]},
    "jump-add": {"interventions": [sae("jump-l2", 5, "add", strength=-10.0)]},
    "topk-clamp": {"interventions": [sae("topk-l3", f, "clamp", value=4.0) for f in range(0, 64, 8)]},
    "when": {"interventions": [sae("relu-l1", 3, "add", strength=12.0, when={"feature": 7, "above": 0.2})]},
    "prompt-only": {"interventions": [{"type": "vector", "vector": "calm", "coef": 4.0}], "positions": "prompt"},
    "generated-only": {"interventions": [{"type": "vector", "vector": "calm", "coef": 4.0}], "positions": "generated"},
    "mixed": {"interventions": [sae("relu-l1", 3, "add", strength=6.0), sae("jump-l2", 9, "clamp", value=8.0),
                                {"type": "vector", "vector": "calm", "coef": 2.0}]},
}
NAMES = list(CASES)
# Short prompts, plus two long ones that chunked prefill (max_num_batched_tokens=64) splits over steps.
PROMPTS = {name: prompt(i, 12 + i) for i, name in enumerate(NAMES)}
PROMPTS["long-caa"], CASES["long-caa"] = prompt(100, 150), CASES["caa"]
PROMPTS["long-prompt-only"], CASES["long-prompt-only"] = prompt(101, 170), CASES["prompt-only"]
NAMES = list(CASES)


@pytest.fixture(scope="module")
def hf(artifacts):
    return {n: hf_greedy(artifacts, PROMPTS[n], CASES[n], MAX_TOKENS) for n in NAMES}


@pytest.fixture(scope="module")
def llm(artifacts, mode):
    engine = make_llm(artifacts, mode, max_num_batched_tokens=64)
    yield engine
    close(engine)


@pytest.fixture(scope="module")
def batched(llm):
    return dict(zip(NAMES, run(llm, [PROMPTS[n] for n in NAMES], [CASES[n] for n in NAMES])))


def test_steering_has_an_effect_in_the_reference(artifacts, hf):
    """Guards the other tests against vacuity: every case changes the reference output."""
    for name in NAMES:
        if CASES[name] is None:
            continue
        plain_tokens, plain_lp = hf_greedy(artifacts, PROMPTS[name], None, MAX_TOKENS)
        tokens, lp = hf[name]
        assert tokens != plain_tokens or (lp - plain_lp).abs().max() > 0.05, name


@pytest.mark.parametrize("name", NAMES)
def test_matches_hugging_face_hooks(name, batched, hf):
    tokens, logprobs = hf[name]
    out = batched[name]
    assert list(out.token_ids) == tokens
    for tok, lp in first_logprobs(out).items():
        assert abs(lp - logprobs[tok].item()) < LOGPROB_ATOL, (tok, lp, logprobs[tok].item())


def test_batch_equals_solo(llm, batched):
    for name in NAMES:
        solo = run(llm, [PROMPTS[name]], [CASES[name]])[0]
        assert list(solo.token_ids) == list(batched[name].token_ids), name
        for tok, lp in first_logprobs(solo).items():
            assert abs(lp - first_logprobs(batched[name])[tok]) < LOGPROB_ATOL, name


def test_identical_steering_shares_one_slot_and_still_isolates(llm):
    """16 requests: 8 with one config (one table slot), 8 with distinct strengths."""
    from sae_steer.vllm_plugin import steering_op
    shared = CASES["relu-add"]
    distinct = [{"interventions": [sae("relu-l1", 3, "add", strength=2.0 * i)]} for i in range(1, 9)]
    steerings = [shared] * 8 + distinct
    prompts = [prompt(200 + i, 10) for i in range(16)]
    outs = run(llm, prompts, steerings)
    for p, s, out in zip(prompts, steerings, outs):
        assert list(run(llm, [p], [s])[0].token_ids) == list(out.token_ids)
    # Finished requests leave the persistent batch at the next step's update: run one more step.
    run(llm, [prompt(300, 4)], [None], max_tokens=2)
    assert not steering_op._table.rows.live, "every slot is released once its requests finish"
