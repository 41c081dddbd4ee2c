"""Hugging Face transformers reference: the same weights, steered by forward hooks doing the
reference math of `sae_steer.edits`. Greedy decoding recomputes the whole sequence each step,
so positions are simply 0..T-1."""
from __future__ import annotations

from functools import lru_cache

import torch

from sae_steer.edits import steer_residual
from sae_steer.formats import load_sae, load_vector
from sae_steer.spec import Steering


@lru_cache(maxsize=2)
def _hf_model(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(artifacts, prompt_ids: list[int], steering: dict | None, max_tokens: int,
              logit_bias: torch.Tensor | None = None):
    """-> (generated token ids, log-probabilities of the first generated step [vocab]).
    logit_bias [vocab] is added to the logits before each greedy choice (not to the log-probabilities)."""
    model = _hf_model(str(artifacts.model))
    parsed = Steering.model_validate(steering) if steering else None
    saes = {n: load_sae(p) for n, p in artifacts.saes.items()}
    vectors = {n: load_vector(p) for n, p in artifacts.vectors.items()}
    prompt_len = len(prompt_ids)

    def hook(layer):
        def fn(module, inputs, output):
            x = output[0] if isinstance(output, tuple) else output  # [1, T, d]
            y = steer_residual(x[0], torch.arange(x.shape[1]), prompt_len, layer, parsed, saes, vectors)[None]
            return (y, *output[1:]) if isinstance(output, tuple) else y
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)] if parsed else []
    try:
        seq, first = list(prompt_ids), None
        with torch.no_grad():
            for _ in range(max_tokens):
                logits = model(torch.tensor([seq])).logits[0, -1].float()
                if first is None:
                    first = torch.log_softmax(logits, -1)
                seq.append(int((logits if logit_bias is None else logits + logit_bias).argmax()))
    finally:
        for h in handles:
            h.remove()
    return seq[prompt_len:], first
