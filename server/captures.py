"""POST /v1/steering/captures (admin key): residual-stream activations of the served model over a corpus,
at every prompt position of chosen layers, recorded by the engine's own steering op and streamed to
safetensors shards on the server's disk by the offline `sae_steer.capture`'s own pieces (tokenizing, capture
requests, reads, shard writer), so `sae-steer fit-sae --capture DIR` and the feature-records builder read
either.

Bounded like CAA builds: at most MAX_TEXTS texts of at most MAX_TEXT_CHARS characters, each cut to
`max_tokens_per_text` tokens (below the model's context), at most CAPTURE_CONCURRENCY engine requests in
flight across all builds; the shards are written under `<vector dir>/captures/<name>` (inside `roots`
when set), off the event loop."""
from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus

import torch
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from sae_steer.capture import SHARD_TOKENS, CaptureMissing, ShardWriter, tokenize_texts
from sae_steer.server import metrics
from sae_steer.server.auth import require_admin
from sae_steer.server.errors import error
from sae_steer.server.state import state
from sae_steer.spec import SteeringError, check_capture_layers

logger = logging.getLogger("vllm.sae_steer")
router = APIRouter()
MAX_TEXTS = 4096
MAX_TEXT_CHARS = 8192


class CaptureRequest(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)
    layers: list[int] = Field(min_length=1)
    max_tokens_per_text: int = Field(default=256, ge=2, le=8192)
    overwrite: bool = False


@router.post("/v1/steering/captures", dependencies=[Depends(require_admin)], status_code=201)
@metrics.counted("captures")
async def capture(body: CaptureRequest, raw_request: Request):
    st = state(raw_request)
    try:
        layers = check_capture_layers(body.layers, st.facts)
    except SteeringError as e:
        return error(str(e), e.field)
    for i, text in enumerate(body.texts):
        if not text or len(text) > MAX_TEXT_CHARS:
            return error(f"texts[{i}]: 1..{MAX_TEXT_CHARS} characters, got {len(text)}", f"texts[{i}]")
    out_dir = st.vector_dir / "captures" / body.name
    if (out_dir / "manifest.json").exists() and not body.overwrite:
        return error(f"capture {body.name!r} exists; pass overwrite=true to replace it", "name", HTTPStatus.CONFLICT)
    tok = await asyncio.to_thread(st.tokenizer)
    limit, docs = await asyncio.to_thread(tokenize_texts, tok, body.texts, body.max_tokens_per_text, st.max_model_len)
    if not docs:
        return error("every text is shorter than 2 tokens", "texts")
    logger.info("sae-steer: capture %r: %d texts, %d tokens, layers %s", body.name, len(docs),
                sum(len(ids) for _, ids in docs), layers)
    start = time.monotonic()

    # bfloat16, as `sae-steer capture` stores it: float16 overflows on streams like Gemma 3's (norms of 10^4-10^5)
    writer = await asyncio.to_thread(ShardWriter, out_dir, layers, SHARD_TOKENS, torch.bfloat16)
    batch = 64  # texts in flight at once (the capture slots bound the engine requests); shards in text order
    for b in range(0, len(docs), batch):
        chunk = docs[b:b + batch]
        try:
            acts = await asyncio.gather(*(st.capture(ids, layers, f"texts[{doc}]") for doc, ids in chunk))
        except CaptureMissing as e:
            return error(str(e), status=HTTPStatus.SERVICE_UNAVAILABLE)
        for (doc, ids), got in zip(chunk, acts):
            await asyncio.to_thread(writer.add, got, ids, doc)
        logger.info("sae-steer: capture %r: %d/%d texts", body.name, min(b + batch, len(docs)), len(docs))
    manifest = await asyncio.to_thread(writer.close, len(docs), limit, str(st.model_path), time.monotonic() - start)
    return {"name": body.name, "path": str(out_dir), **manifest}
