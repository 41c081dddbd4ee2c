"""GET /v1/steering/saes and /v1/steering/saes/{name}/features/{index} (decoder norm, logit-lens top
tokens, label). The logit lens loads on first use, in a worker thread: the event loop never waits on it."""
from __future__ import annotations

import asyncio
from http import HTTPStatus

from fastapi import APIRouter, Request

from sae_steer.server.errors import error
from sae_steer.server.state import state

router = APIRouter()


@router.get("/v1/steering/saes")
async def list_saes(raw_request: Request):
    st = state(raw_request)
    return {"object": "list", "data": [
        {"name": n, "layer": f.layer, "d_sae": f.d_sae, "architecture": f.architecture, "d_model": f.d_model}
        for n, f in sorted(st.facts.saes.items())]}


@router.get("/v1/steering/saes/{name}/features/{index}")
async def describe_feature(name: str, index: int, raw_request: Request, top_k: int = 10):
    st = state(raw_request)
    if name not in st.facts.saes:
        return error(f"unknown SAE {name!r}; registered: {sorted(st.facts.saes)}", "name", HTTPStatus.NOT_FOUND)
    if not 0 <= index < st.facts.saes[name].d_sae:
        return error(f"feature {index} is out of range (d_sae={st.facts.saes[name].d_sae})", "index",
                     HTTPStatus.NOT_FOUND)
    if not 1 <= top_k <= 100:
        return error("top_k must be in 1..100", "top_k")

    def describe() -> dict:  # loads the lens and tokenizer on first use: in a worker thread
        lens = st.logit_lens()
        lens_tokens = lens.top_tokens(name, index, top_k)
        tok = st.tokenizer()

        def tokens(pairs):
            return [{"token_id": t, "token": tok.decode([t]), "logit": v} for t, v in pairs]

        return {"sae": name, "index": index, "layer": st.facts.saes[name].layer,
                "decoder_norm": float(lens.saes[name].W_dec[index].float().norm()),
                "top_tokens": tokens(lens_tokens["top"]), "bottom_tokens": tokens(lens_tokens["bottom"]),
                "label": st.labels.get(name, {}).get(index)}

    return await asyncio.to_thread(describe)
