"""Response bodies of the completion routes: telemetry records attached to the (first) choice, plain
or streamed, and compare's unsteered completion as a last choices-less chunk of a stream."""
from __future__ import annotations

import json

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from sae_steer.server.state import SteeringState
from sae_steer.vllm_plugin import observers


def response_body(response: BaseModel, telemetry: dict | None, st: SteeringState) -> dict:
    body = response.model_dump()
    if telemetry:
        _attach_telemetry(body["choices"][0], telemetry, st)
    return body


def respond(result, telemetry: dict | None, st: SteeringState):
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    if isinstance(result, ErrorResponse):
        return JSONResponse(content=result.model_dump(), status_code=result.error.code)
    if isinstance(result, BaseModel):
        return JSONResponse(content=response_body(result, telemetry, st))
    return StreamingResponse(stream_with_telemetry(result, telemetry, st), media_type="text/event-stream")


async def stream_with_telemetry(chunks, telemetry: dict | None, st: SteeringState):
    reader = observers.TelemetryReader(telemetry["id"]) if telemetry else None
    try:
        async for chunk in chunks:
            if reader and chunk.startswith("data: {"):
                body = json.loads(chunk[6:])
                if body.get("choices"):
                    body["choices"][0]["telemetry"] = _telemetry_entries(reader, telemetry, st)
                    chunk = f"data: {json.dumps(body)}\n\n"
            yield chunk
    finally:
        if telemetry:
            observers.discard(telemetry["id"])


def _attach_telemetry(choice: dict, telemetry: dict, st: SteeringState) -> None:
    """A finished request: all its records, then its files go."""
    choice["telemetry"] = _telemetry_entries(observers.TelemetryReader(telemetry["id"]), telemetry, st)
    observers.discard(telemetry["id"])


def _telemetry_entries(reader: observers.TelemetryReader, telemetry: dict, st: SteeringState) -> list[dict]:
    """[{"token_index", "features": [{"index", "activation", "label"}]}] for the records not sent yet."""
    labels = st.labels.get(telemetry["sae"], {})
    return [{"token_index": index, "features": [
        {"index": i, "activation": a, "label": labels.get(i)}
        for i, a in zip(record["features"], record["activations"]) if a > 0]}
        for index, record in sorted(reader.new_records(), key=lambda r: r[0])]


async def stream_then_unsteered(chunks, unsteered_task):
    """The steered stream, then one chunk with no choices and `unsteered` (the shape of a usage chunk,
    which OpenAI clients accept), then [DONE]."""
    last = {}
    async for chunk in chunks:
        if chunk.startswith("data: [DONE]"):
            unsteered = await unsteered_task
            body = {k: last.get(k) for k in ("id", "object", "created", "model")}
            body["choices"] = []
            body["unsteered"] = ({"id": unsteered.id, "choices": unsteered.model_dump()["choices"]}
                                 if hasattr(unsteered, "choices") else {"error": unsteered.model_dump()})
            yield f"data: {json.dumps(body)}\n\n"
        elif chunk.startswith("data: {"):
            last = json.loads(chunk[6:])
        yield chunk
