"""POST /v1/steering/lens: the logit lens of a prompt, the top predicted tokens at every position of every
capturable layer, optionally under a request's steering (the playground draws both grids).

One capture request over the prompt (the engine's steering op records the residual stream x at each chosen
layer, as the capture route does), then, for each position and layer, the model's own final norm and
unembedding (LogitHead.logits, read from the checkpoint and its config): p = softmax(cap(W_U (g * n(x) + b)))
with n(x) = x / sqrt(mean(x^2) + eps), x centered first and b the norm's bias for LayerNorm families (GPT-2,
GPT-NeoX; RMSNorm has no bias), eps the model's, cap Gemma 2's logit soft-cap. At the last layer that is the
model's own next-token distribution.

It needs no admin key: it writes nothing, and its engine work is a completion of one token over the same prompt
(one prefill, cut to `max_positions` tokens, through the same capture slots as CAA builds); the unembedding runs
in the API process (the checkpoint's head, on CPU), LENS_SLOTS requests at a time, off the event loop. Under
/v1, it follows vLLM's --api-key like the completion routes."""
from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from sae_steer.capture import CaptureMissing, tokenize_texts
from sae_steer.server.errors import error
from sae_steer.server.state import LogitLensUnavailable, state
from sae_steer.spec import SteeringError, check_capture_layers

router = APIRouter()
MAX_PROMPT_CHARS = 4096
LENS_SLOTS = asyncio.Semaphore(2)  # lens unembeddings at once: [positions, vocab] matmuls per layer, on CPU


class LensRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="the text to read")
    layers: list[int] | None = Field(default=None, description="capturable (steerable) layers; default: all of them")
    top_k: int = Field(default=3, ge=1, le=10, description="tokens per cell")
    max_positions: int = Field(default=64, ge=2, le=256, description="the prompt is cut to this many tokens")
    steering: Any = Field(default=None, description="interventions to read the stream under (as in completions)")


@router.post("/v1/steering/lens", responses={
    400: {"description": "bad request, e.g. invalid steering"},
    422: {"description": "the model's final norm or unembedding is unreadable"}})
async def logit_lens(body: LensRequest, raw_request: Request):
    """-> {"tokens": [str], "token_ids": [int], "layers": [L], "steered": bool,
    "grid": [per layer: [per position: [{"token", "token_id", "prob"}] * top_k]]}."""
    st = state(raw_request)
    try:
        layers = check_capture_layers(body.layers if body.layers is not None else sorted(st.facts.steerable_layers),
                                      st.facts)
        steering = st.check_steering(body.steering) if body.steering is not None else None
    except SteeringError as e:
        return error(str(e), e.field)
    try:
        head = await asyncio.to_thread(st.logit_head)
    except LogitLensUnavailable as e:
        return error(str(e), None, HTTPStatus.UNPROCESSABLE_ENTITY)
    tok = await asyncio.to_thread(st.tokenizer)
    _, docs = await asyncio.to_thread(tokenize_texts, tok, [body.prompt], body.max_positions, st.max_model_len)
    if not docs:
        return error("the prompt is shorter than 2 tokens", "prompt")
    ids = docs[0][1]
    try:
        acts = await st.capture(ids, layers, "prompt", steering=steering)
    except CaptureMissing as e:
        return error(str(e), status=HTTPStatus.SERVICE_UNAVAILABLE)

    def cells():  # [n, vocab] matmuls per layer: off the event loop
        grid = []
        for L in layers:
            top = head.logits(acts[L]).softmax(dim=-1).topk(body.top_k, dim=-1)
            grid.append([[{"token": tok.decode([t]), "token_id": t, "prob": p}
                          for t, p in zip(ti, pi)] for ti, pi in zip(top.indices.tolist(), top.values.tolist())])
        return grid

    async with LENS_SLOTS:
        grid = await asyncio.to_thread(cells)
    return {"tokens": [tok.decode([t]) for t in ids], "token_ids": ids, "layers": layers,
            "steered": steering is not None, "grid": grid}
