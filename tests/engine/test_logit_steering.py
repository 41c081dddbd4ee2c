"""Logit-space feature steering in a real engine (tiny Llama, eager; the bias is added to the sampler's
logits, after the model, so compilation does not change it): greedy tokens equal a Hugging Face
reference that adds the same bias each step, in one batch with unsteered requests, which stay
identical to an unsteered run, and with residual steering, alone and in the same request."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sae_steer.formats import load_sae
from tests.engine.conftest import close, make_llm, prompt, run
from tests.reference import hf_greedy

pytestmark = pytest.mark.engine
MAX_TOKENS = 12


def logit(sae, feature, strength):
    return {"type": "logit", "sae": sae, "feature": feature, "strength": strength}


def plain_bias(artifacts, terms) -> torch.Tensor:
    """sum_j strength_j * l_j / max|l_j|,  l_j = W_U (g * W_dec[feature_j]): the README's formula, written out
    from the model's files (Llama: RMSNorm gain g = model.norm.weight, W_U = lm_head.weight)."""
    weights = load_file(str(artifacts.model / "model.safetensors"))
    W_U, g = weights["lm_head.weight"].float(), weights["model.norm.weight"].float()
    bias = torch.zeros(W_U.shape[0])
    for sae, feature, strength in terms:
        u = load_sae(artifacts.saes[sae]).W_dec[feature].float()
        lens = W_U @ (g * u)
        bias += strength * lens / lens.abs().max()
    return bias


SAE_ADD = {"type": "sae", "sae": "relu-l1", "feature": 3, "mode": "add", "strength": 12.0}
CASES = [  # (steering, its logit terms)
    (None, []),
    ({"interventions": [logit("relu-l1", 3, 8.0)]}, [("relu-l1", 3, 8.0)]),
    (None, []),
    ({"interventions": [logit("topk-l3", 10, 5.0), logit("relu-l1", 7, -6.0)]},
     [("topk-l3", 10, 5.0), ("relu-l1", 7, -6.0)]),
    ({"interventions": [SAE_ADD]}, []),
    ({"interventions": [SAE_ADD, logit("relu-l1", 3, 8.0)], "positions": "generated"}, [("relu-l1", 3, 8.0)]),
    ({"interventions": [logit("relu-l1", 3, 8.0)]}, [("relu-l1", 3, 8.0)]),  # shares a bias row with case 1
]


def test_logit_steering_matches_the_reference_in_a_mixed_batch(artifacts):
    prompts = [prompt(700 + i, 6 + 3 * i) for i in range(len(CASES))]
    steerings = [s for s, _ in CASES]
    llm = make_llm(artifacts, "eager")
    try:
        mixed = run(llm, prompts, steerings, MAX_TOKENS)
        plain = run(llm, prompts, [None] * len(prompts), MAX_TOKENS)
    finally:
        close(llm)
    for i, ((steering, terms), p) in enumerate(zip(CASES, prompts)):
        got = list(mixed[i].token_ids)
        bias = plain_bias(artifacts, terms) if terms else None
        expected, _ = hf_greedy(artifacts, p, steering, MAX_TOKENS, logit_bias=bias)
        assert got == expected, (i, steering)
        if steering is None:  # bit-identical to the unsteered run, log-probabilities included
            assert got == list(plain[i].token_ids)
            assert mixed[i].logprobs == plain[i].logprobs
        else:
            assert got != list(plain[i].token_ids), f"case {i} did not change the output: a weak test"
    # the logit bias alone changes greedy output the way the reference says, not by chance
    unbiased, _ = hf_greedy(artifacts, prompts[1], None, MAX_TOKENS)
    assert unbiased == list(plain[1].token_ids) != list(mixed[1].token_ids)
