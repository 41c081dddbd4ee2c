"""POST /v1/completions and /v1/chat/completions: vLLM's own routes plus `steering`, `telemetry` and
`compare`. A request is validated against the served model first (400 naming the field), then handed
to vLLM's serving handler (twice for compare: steered and unsteered, one seed)."""
from __future__ import annotations

import asyncio
import random
import uuid
from http import HTTPStatus

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from sae_steer.server import metrics
from sae_steer.server.errors import error
from sae_steer.server.protocol import SteeredChatCompletionRequest, SteeredCompletionRequest, reserved_xarg
from sae_steer.server.responses import response_body, respond, stream_with_telemetry, stream_then_unsteered
from sae_steer.server.state import SteeringState, state
from sae_steer.spec import SteeringError, parse_telemetry

router = APIRouter()


@router.post("/v1/completions", responses={400: {"description": "bad request, e.g. invalid steering"}})
async def create_completion(request: SteeredCompletionRequest, raw_request: Request):
    return await _serve(request, raw_request, "openai_serving_completion", "create_completion")


@router.post("/v1/chat/completions", responses={400: {"description": "bad request, e.g. invalid steering"}})
async def create_chat_completion(request: SteeredChatCompletionRequest, raw_request: Request):
    return await _serve(request, raw_request, "openai_serving_chat", "create_chat_completion")


async def _serve(request, raw_request: Request, handler_name: str, method: str):
    st = state(raw_request)
    bad = _check(request, st)
    if bad is not None:
        return bad
    metrics.record_steered(request.steering)
    handler = getattr(raw_request.app.state, handler_name)
    if handler is None:
        return error("this model does not support this API", status=HTTPStatus.NOT_FOUND)
    if not request.compare:
        return respond(await getattr(handler, method)(request, raw_request), request.telemetry, st)
    # compare: the same request twice, one without steering, with one shared seed.
    if request.seed is None:
        request.seed = random.randrange(2**31)
    plain = request.model_copy(update={"steering": None, "compare": False, "telemetry": None,
                                       "request_id": f"{getattr(request, 'request_id', None) or uuid.uuid4().hex}-unsteered"})
    if request.stream:
        plain.stream, plain.stream_options = False, None
        unsteered_task = asyncio.ensure_future(getattr(handler, method)(plain, None))
        steered = await getattr(handler, method)(request, raw_request)
        if not isinstance(steered, BaseModel):  # a stream: the unsteered result follows it as a last chunk
            return StreamingResponse(stream_then_unsteered(stream_with_telemetry(steered, request.telemetry, st), unsteered_task),
                                     media_type="text/event-stream")
        unsteered = await unsteered_task
    else:
        steered, unsteered = await asyncio.gather(getattr(handler, method)(request, raw_request),
                                                  getattr(handler, method)(plain, None))
    for result in (steered, unsteered):
        if not isinstance(result, BaseModel) or not hasattr(result, "choices"):
            return respond(result, None, st)
    body = response_body(steered, request.telemetry, st)
    body["unsteered"] = {"id": unsteered.id, "choices": unsteered.model_dump()["choices"]}
    return JSONResponse(content=body)


def _check(request, st: SteeringState) -> JSONResponse | None:
    """Validate the three fields; rewrite built vectors and telemetry ids in place."""
    prefix = ""
    try:
        key = reserved_xarg(request)  # vllm_xargs go into extra_args unchecked: no steering or sae_steer_* keys
        if key is not None:
            raise SteeringError(f"vllm_xargs.{key}", "reserved for sae-steer's server (telemetry ids, CAA "
                                                     "captures); send steering as the top-level `steering` field")
        prefix = _hoist(request)
        if request.steering is not None:
            request.steering = st.check_steering(request.steering)
        if request.telemetry is not None:
            try:
                request.telemetry = parse_telemetry(request.telemetry, st.facts)
            except SteeringError as e:
                raise SteeringError(prefix + e.field, e.message) from None
            if (request.n or 1) > 1 or getattr(request, "use_beam_search", False):
                raise SteeringError(prefix + "telemetry", "telemetry needs n=1 (each choice would need its own record)")
            prompt = getattr(request, "prompt", None)
            if isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
                raise SteeringError(prefix + "telemetry", "telemetry needs a single prompt per request")
            request.telemetry["id"] = uuid.uuid4().hex
        if request.compare:
            if request.steering is None:
                raise SteeringError(prefix + "compare", "compare needs interventions to compare against")
    except SteeringError as e:
        metrics.record_refused(e.field)
        return error(str(e), e.field)
    return None


def _hoist(request) -> str:
    """DESIGN.md puts `telemetry` (and `compare`) inside the steering object; the top level works too.
    Moves them out of `steering` (the engine only sees interventions); returns the prefix of their
    field names for errors ("steering." when they came from inside)."""
    steering = request.steering
    if not isinstance(steering, dict) or not {"telemetry", "compare"} & set(steering):
        return ""
    for key in ("telemetry", "compare"):
        if key in steering and key in request.model_fields_set:
            raise SteeringError(f"steering.{key}", "given both inside `steering` and at the top level")
    if "telemetry" in steering:
        request.telemetry = steering["telemetry"]
    if "compare" in steering:
        if not isinstance(steering["compare"], bool):
            raise SteeringError("steering.compare", "must be true or false")
        request.compare = steering["compare"]
    rest = {k: v for k, v in steering.items() if k not in ("telemetry", "compare")}
    request.steering = rest if set(rest) - {"positions"} else None  # telemetry alone: an unsteered request
    return "steering."
