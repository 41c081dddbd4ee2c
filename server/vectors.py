"""GET/POST /v1/steering/vectors and DELETE /v1/steering/vectors/{name}: CAA vectors built on the
served model from contrast pairs (admin key), bounded in pairs, text length and engine requests in flight."""
from __future__ import annotations

import asyncio
import logging
import re
from http import HTTPStatus

import torch
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from sae_steer.capture import CaptureMissing
from sae_steer.server import metrics
from sae_steer.server.auth import require_admin
from sae_steer.server.errors import error
from sae_steer.server.state import state
from sae_steer.spec import SteeringError, check_capture_layers

logger = logging.getLogger("vllm.sae_steer")
router = APIRouter()
MAX_PAIRS = 1024  # a CAA build runs 2 * pairs engine requests
MAX_TEXT_CHARS = 8192  # per contrast text (and at most the model's context in tokens)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


@router.get("/v1/steering/vectors")
async def list_vectors(raw_request: Request):
    st = state(raw_request)
    data = [{"name": n, "layers": sorted(L), "source": "config",
             "calibration": {k: c[k] for k in ("layer", "coef")} if (c := st.facts.calibrations.get(n)) else None}
            for n, L in sorted(st.facts.vectors.items())]  # calibration: what "coef": "auto" stands for
    data += [{"name": n, "layers": sorted(v), "source": "built", "path": str(st.store.path(n)),
              "calibration": {k: c[k] for k in ("layer", "coef")} if (c := st.built_calibrations.get(n)) else None}
             for n, v in sorted(st.built.items())]
    return {"object": "list", "data": data}


class ContrastPair(BaseModel):
    positive: str = Field(min_length=1, max_length=MAX_TEXT_CHARS,
                          description="text showing the behaviour (ends at the answer token)")
    negative: str = Field(min_length=1, max_length=MAX_TEXT_CHARS,
                          description="the same with the opposite behaviour")


class BuildVectorRequest(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    pairs: list[ContrastPair] = Field(min_length=1, max_length=MAX_PAIRS)
    layers: list[int] = Field(min_length=1)
    overwrite: bool = False


@router.post("/v1/steering/vectors", dependencies=[Depends(require_admin)], status_code=201)
@metrics.counted("caa_builds")
async def build_vector(body: BuildVectorRequest, raw_request: Request):
    """CAA (Panickssery et al. 2024): v_L = mean over pairs of x_L(positive) - x_L(negative), where x_L is
    the residual stream after layer L at the last token of each text (the answer token)."""
    st = state(raw_request)
    try:
        layers = check_capture_layers(body.layers, st.facts)
    except SteeringError as e:
        return error(str(e), e.field)
    if body.name in st.facts.vectors or body.name in st.facts.saes:
        return error(f"{body.name!r} is registered in the server's config; pick another name", "name",
                     HTTPStatus.CONFLICT)
    if not body.overwrite and st.store.exists(body.name):
        return error(f"vector {body.name!r} exists; pass overwrite=true to replace it", "name", HTTPStatus.CONFLICT)
    texts = [t for p in body.pairs for t in (p.positive, p.negative)]
    tok = await asyncio.to_thread(st.tokenizer)
    token_ids = await asyncio.to_thread(lambda: [tok(t, add_special_tokens=True)["input_ids"] for t in texts])
    for i, ids in enumerate(token_ids):
        if st.max_model_len and len(ids) >= st.max_model_len:
            field = f"pairs[{i // 2}].{('positive', 'negative')[i % 2]}"
            return error(f"{field}: {len(ids)} tokens; the served model's context is {st.max_model_len}", field)
    logger.info("sae-steer: building vector %r from %d pairs at layers %s", body.name, len(body.pairs), layers)
    done = 0

    async def capture(i: int, ids: list[int]) -> dict[int, torch.Tensor]:
        nonlocal done
        got = await st.capture(ids, layers, f"pairs[{i // 2}].{('positive', 'negative')[i % 2]}", positions="last")
        done += 1
        if done % max(1, len(texts) // 10) == 0 or done == len(texts):
            logger.info("sae-steer: vector %r: %d/%d texts", body.name, done, len(texts))
        return got

    try:
        acts = await asyncio.gather(*(capture(i, ids) for i, ids in enumerate(token_ids)))
    except CaptureMissing as e:  # the workers' captures never arrived (another host? see the README)
        logger.error("sae-steer: vector %r not built: %s", body.name, e)
        return error(f"cannot build the vector: {e}", status=HTTPStatus.SERVICE_UNAVAILABLE)
    vector = {L: torch.stack([acts[2 * i][L] - acts[2 * i + 1][L] for i in range(len(body.pairs))]).mean(0)
              for L in layers}
    try:
        path = await st.store.put(body.name, vector, {"built_from_pairs": str(len(body.pairs)),
                                                      "method": "caa-mean-difference"}, overwrite=body.overwrite)
    except FileExistsError:  # another replica sharing the store wrote this name meanwhile
        return error(f"vector {body.name!r} exists; pass overwrite=true to replace it", "name", HTTPStatus.CONFLICT)
    logger.info("sae-steer: vector %r saved to %s", body.name, path)
    return {"name": body.name, "layers": layers, "pairs": len(body.pairs), "path": str(path),
            "norms": {str(L): float(v.norm()) for L, v in vector.items()}}


@router.delete("/v1/steering/vectors/{name}", dependencies=[Depends(require_admin)])
async def delete_vector(name: str, raw_request: Request):
    st = state(raw_request)
    if name in st.facts.vectors:
        return error(f"vector {name!r} comes from the server's config and cannot be deleted over HTTP", "name",
                     HTTPStatus.CONFLICT)
    if not (name in st.built or re.match(NAME_PATTERN, name)) or not await st.store.remove(name):
        return error(f"no built vector {name!r}", "name", HTTPStatus.NOT_FOUND)
    return {"name": name, "deleted": True}
