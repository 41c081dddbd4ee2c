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


# Other families: where the unembedding and final norm are (adapters.Head), and the norm's kind.
# family: (Hugging Face final norm, its gain from the weight, whether the direction is centered first)
HEADS = {"gpt2": ("transformer.ln_f", lambda w: w, True), "gemma2": ("model.norm", lambda w: 1 + w, False),
         "gemma3": ("model.norm", lambda w: 1 + w, False), "gpt_neox": ("gpt_neox.final_layer_norm", lambda w: w, True)}


def hf_logit_reference(model_dir: str, sae_path: str, family: str, prompts: list[list[int]]) -> list[list[int]]:
    """Builds the tiny model of `family` in model_dir, then Hugging Face greedy tokens: prompts[0] plain, prompts[1]
    with the bias of feature 5 at strength 8 added to every step's logits, prompts[1] plain. The bias is written
    out here: 8 * l / max|l|, l = W_U (g * u)."""
    import operator

    from transformers import AutoModelForCausalLM

    from sae_steer.formats import load_sae
    from sae_steer.tiny_model import build_tiny_model
    build_tiny_model(model_dir, family, layers=2)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    norm_path, gain_of, centered = HEADS[family]
    W_U = hf.get_output_embeddings().weight.detach()
    g = gain_of(operator.attrgetter(norm_path)(hf).weight.detach())
    d = load_sae(sae_path).W_dec[5]
    u = d - d.mean() if centered else d
    lens = W_U @ (g * u)
    bias = 8.0 * lens / lens.abs().max()

    def greedy(p, with_bias):
        seq = list(p)
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                logits = hf(torch.tensor([seq])).logits[0, -1]
                seq.append(int((logits + bias if with_bias else logits).argmax()))
        return seq[len(p):]

    return [greedy(prompts[0], False), greedy(prompts[1], True), greedy(prompts[1], False)]


@pytest.mark.parametrize("family", sorted(HEADS))
def test_logit_steering_in_other_families(family, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from vllm import LLM

    from sae_steer.formats import save_sae
    from sae_steer.tiny_model import random_sae

    model_dir = tmp_path / family  # built by the reference's process
    sae_dir = save_sae(random_sae(128, 32, 0, "relu", seed=3), tmp_path / "sae")
    prompts = [prompt(800, 9), prompt(801, 12)]
    # Model and reference in a fresh process: vLLM's Transformers backend (GPT-NeoX) decorates the Hugging Face
    # model classes it runs in every process that built such an engine (earlier tests in this session may have).
    code = ("import json, sys; from tests.engine.test_logit_steering import hf_logit_reference; "
            "print(json.dumps(hf_logit_reference(*json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([str(model_dir), str(sae_dir), family, prompts])],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    unsteered, steered, unbiased = json.loads(proc.stdout.strip().splitlines()[-1])
    assert steered != unbiased
    llm = LLM(model=str(model_dir), enforce_eager=True, dtype="float32", max_model_len=256, seed=0, block_size=32,
              max_num_seqs=8, additional_config={"sae_steer": {"saes": {"s": str(sae_dir)}}})
    try:
        out = run(llm, prompts, [None, {"interventions": [logit("s", 5, 8.0)]}], MAX_TOKENS)
    finally:
        close(llm)
    assert list(out[0].token_ids) == unsteered
    assert list(out[1].token_ids) == steered
