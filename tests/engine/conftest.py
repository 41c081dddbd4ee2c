"""Real vLLM engines (the CPU build) with the plugin, in this process: one engine at a time."""
from __future__ import annotations

import gc

import pytest
import torch

MAX_TOKENS = 16


def make_llm(artifacts, mode: str, settings: dict | None = None, **kwargs):
    from vllm import LLM
    extra = {"sae_steer": artifacts.settings if settings is None else settings}
    options = dict(model=str(artifacts.model), enforce_eager=(mode == "eager"), dtype="float32", max_model_len=512,
                   seed=0, block_size=32, max_num_seqs=32, additional_config=extra)
    return LLM(**{**options, **kwargs})


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def prompt(seed: int, length: int) -> list[int]:
    """Random token ids (ids < 5 are special tokens of the tiny tokenizer)."""
    return torch.randint(5, 500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(llm, prompts: list[list[int]], steerings: list[dict | None], max_tokens: int = MAX_TOKENS, logprobs: int = 5):
    from vllm import SamplingParams
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs, ignore_eos=True,
                             extra_args=None if s is None else {"steering": s}) for s in steerings]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def first_logprobs(output) -> dict[int, float]:
    return {tok: lp.logprob for tok, lp in output.logprobs[0].items()}


@pytest.fixture(scope="module", params=["eager", "compiled"])
def mode(request):
    return request.param
