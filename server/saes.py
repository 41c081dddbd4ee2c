"""GET /v1/steering/saes, /v1/steering/saes/{name}/features/{index} (decoder norm, logit-lens top tokens,
label, calibrated strengths, and, where the SAE has feature records beside it, its top-activating contexts,
activation frequency and automatic label) and /v1/steering/saes/{name}/features?search=WORD (features whose
contexts or logit-lens tokens mention the word). The logit lens (read from the model's safetensors by its family's
names), the SAE and the records load on first use, in a worker thread: the event loop never waits on them."""
from __future__ import annotations

import asyncio
from http import HTTPStatus

from fastapi import APIRouter, Request

from sae_steer.server.errors import error
from sae_steer.server.state import LogitLensUnavailable, state

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

    def describe():  # loads the lens, SAE and tokenizer on first use: in a worker thread
        try:
            lens = st.logit_lens(name, index, top_k)
        except LogitLensUnavailable as e:  # a checkpoint the family's names do not fit: say what is missing
            return error(str(e), None, HTTPStatus.UNPROCESSABLE_ENTITY)
        tok = st.tokenizer()

        def tokens(pairs):
            return [{"token_id": t, "token": tok.decode([t]), "logit": v} for t, v in pairs]

        out = {"sae": name, "index": index, "layer": st.facts.saes[name].layer,
               "decoder_norm": float(st.sae(name).W_dec[index].float().norm()),
               "top_tokens": tokens(lens["top"]), "bottom_tokens": tokens(lens["bottom"]),
               "label": st.labels.get(name, {}).get(index),
               # `sae-steer eval`'s stored strengths per mode ({"add": {"strength", "score"}, ...}): "auto"
               "calibration": st.facts.calibrations.get(name, {}).get("features", {}).get(str(index))}
        records = st.feature_records(name)
        if records is not None:
            record = records.get(index)
            out.update(auto_label=record["label"], frequency=record["frequency"],
                       max_activation=record["max_activation"], contexts=record["contexts"],
                       direct_effect=record["logit_lens"])
            out["label"] = out["label"] or record["label"]
        return out

    return await asyncio.to_thread(describe)


@router.get("/v1/steering/saes/{name}/features")
async def search_features(name: str, raw_request: Request, search: str = "", limit: int = 10):
    st = state(raw_request)
    if name not in st.facts.saes:
        return error(f"unknown SAE {name!r}; registered: {sorted(st.facts.saes)}", "name", HTTPStatus.NOT_FOUND)
    if not 1 <= limit <= 100:
        return error("limit must be in 1..100", "limit")
    from sae_steer.feature_records import words
    if len(words(search)) != 1 or len(search) > 64:
        return error("search must be one word (letters or digits, at most 64 characters)", "search")
    records = await asyncio.to_thread(st.feature_records, name)
    if records is None:
        return error(f"SAE {name!r} has no feature records (features.jsonl beside it: `sae-steer fit-sae` "
                     "writes them)", "name", HTTPStatus.NOT_FOUND)
    return {"object": "list", "sae": name, "search": search, "data": records.search(search, limit)}
