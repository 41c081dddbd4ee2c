"""Every supported model family, steered by the real engine (eager and compiled) == a Hugging Face
forward-hook reference on the same weights, token for token.

The reference math is written here a second time, plainly (ReLU SAE, clamp/add edits that keep the
reconstruction error, a CAA-style vector), and hooked onto `layers[L]` / `h[L]` of the Hugging Face
model: the definition of our layer numbering (TransformerLens `blocks.L.hook_resid_post`).
"""
from __future__ import annotations

import operator

import pytest
import torch

from sae_steer.formats import save_sae
from sae_steer.tiny_model import TINY_FAMILIES, build_tiny_model, random_sae
from sae_steer.vllm_plugin.adapters import family_of
from tests.engine.conftest import close, prompt

pytestmark = pytest.mark.engine

D_MODEL, N_LAYERS, LAYER, D_SAE = 128, 3, 1, 64
MAX_TOKENS = 8
VECTOR = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(12))
CASES = {
    "unsteered": None,
    "vector": {"interventions": [{"type": "vector", "layer": LAYER, "values": VECTOR.tolist(), "coef": 4.0}]},
    "sae": {"interventions": [{"type": "sae", "sae": "s", "feature": 3, "mode": "clamp", "value": 25.0},
                              {"type": "sae", "sae": "s", "feature": 7, "mode": "add", "strength": 20.0}]},
}
PROMPTS = {name: prompt(40 + i, 10 + 3 * i) for i, name in enumerate(CASES)}


def reference_delta(x: torch.Tensor, case: str, sae) -> torch.Tensor:
    """The steering of one case at LAYER, for the stream x [T, d], in plain torch."""
    if case == "vector":
        return 4.0 * VECTOR
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)  # [T, d_sae]
    return (25.0 - f[:, 3:4]) * sae.W_dec[3] + 20.0 * sae.W_dec[7]


def hf_greedy(model_dir, family, prompt_ids: list[int], case: str, sae, dtype=torch.float32) -> list[int]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    block = operator.attrgetter(family.hf_blocks)(model)[LAYER]

    def hook(module, inputs, output):
        x = output[0] if isinstance(output, tuple) else output  # [1, T, d]
        y = x + reference_delta(x[0].float(), case, sae).to(x.dtype)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    handle = block.register_forward_hook(hook) if CASES[case] else None
    seq = list(prompt_ids)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    if handle:
        handle.remove()
    return seq[len(prompt_ids):]


def vllm_greedy(llm, names: list[str]) -> dict[str, list[int]]:
    from vllm import SamplingParams
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                             extra_args=None if CASES[n] is None else {"steering": CASES[n]}) for n in names]
    outs = llm.generate([{"prompt_token_ids": PROMPTS[n]} for n in names], params, use_tqdm=False)
    return {n: list(o.outputs[0].token_ids) for n, o in zip(names, outs)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (model dir, SAE path, {case: Hugging Face tokens}, {case: unsteered HF tokens}), built once.

    The references are computed before any engine starts: vLLM's Transformers backend (GPT-NeoX)
    decorates the Hugging Face model class in this process for torch.compile."""
    import transformers
    root = tmp_path_factory.mktemp("families")
    sae = random_sae(D_MODEL, D_SAE, LAYER, "relu", seed=5)
    sae_path = save_sae(sae, root / "sae")
    out = {}
    for name in TINY_FAMILIES:
        model_dir = build_tiny_model(root / name, name, hidden=D_MODEL, layers=N_LAYERS)
        family = family_of(transformers.AutoConfig.from_pretrained(model_dir).architectures)
        expected = {c: hf_greedy(model_dir, family, PROMPTS[c], c, sae) for c in CASES}
        plain = {c: hf_greedy(model_dir, family, PROMPTS[c], "unsteered", sae) for c in CASES}
        bf16 = {c: hf_greedy(model_dir, family, PROMPTS[c], c, sae, torch.bfloat16) for c in CASES} \
            if name == "qwen2" else None
        out[name] = (model_dir, sae_path, expected, plain, bf16)
    return out


def start(model_dir, sae_path, mode: str, dtype: str = "float32"):
    from vllm import LLM
    return LLM(model=str(model_dir), enforce_eager=(mode == "eager"), dtype=dtype, max_model_len=256, seed=0,
               block_size=32, max_num_seqs=8, additional_config={"sae_steer": {"saes": {"s": str(sae_path)}}})


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_family_steers_exactly_as_hugging_face(tiny, name, mode):
    model_dir, sae_path, expected, plain, _ = tiny[name]
    for c in ("vector", "sae"):  # guards against vacuity: the steering changes the reference's tokens
        assert expected[c] != plain[c], (name, c)
    llm = start(model_dir, sae_path, mode)
    try:
        got = vllm_greedy(llm, list(CASES))
    finally:
        close(llm)
    assert got == expected, name


def test_bfloat16_engine_steers_as_hugging_face_in_bfloat16(tiny):
    model_dir, sae_path, _, _, expected = tiny["qwen2"]
    llm = start(model_dir, sae_path, "eager", dtype="bfloat16")
    try:
        got = vllm_greedy(llm, list(CASES))
    finally:
        close(llm)
    for c in CASES:
        # bf16 kernels differ between the two engines: the first tokens must agree, and steering must act
        assert got[c][:3] == expected[c][:3], c
    assert got["vector"] != got["unsteered"] or got["sae"] != got["unsteered"]
