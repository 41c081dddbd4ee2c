"""sae-steer's HTTP extension: a `vllm.endpoint_plugins` entry point for vLLM's OpenAI server.

Routes (under /v1, so vLLM's `--api-key` guards them when set; /steer, a page holding no data, lies outside):

    POST   /v1/completions, /v1/chat/completions   vLLM's own, plus `steering`, `telemetry`, `compare`
    GET    /v1/steering/saes                        registered SAEs
    GET    /v1/steering/saes/{name}/features/{i}    decoder norm, logit-lens top tokens, label
    GET    /v1/steering/vectors                     registered and built vectors
    POST   /v1/steering/vectors                     build a CAA vector from contrast pairs (admin key)
    DELETE /v1/steering/vectors/{name}              drop a built vector (admin key)
    POST   /v1/steering/captures                    record residual-stream activations over texts (admin key)
    POST   /v1/steering/lens                        a prompt's logit lens at every capturable layer
    GET    /steer                                   the browser playground (playground.py, static/)

The completion routes replace vLLM's (endpoint plugins may override a path); they validate the
steering against the served model up front (400 naming the field, OpenAI's error shape) and then
hand the request to vLLM's own serving handlers.

Modules: completions.py (the completion routes, validation, compare), responses.py (bodies and SSE with
telemetry), saes.py (SAE listing, feature route), vectors.py (CAA vectors), captures.py (activation capture), auth.py (admin key),
state.py (SteeringState), store.py (the vector directory replicas share), errors.py (OpenAI's error shape), protocol.py (request models), lens.py (logit lens by layer),
playground.py (the page; its assets in static/).
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request

from sae_steer.server import captures, completions, lens, metrics, playground, saes, vectors
from sae_steer.server.errors import HTTPError
from sae_steer.server.state import SteeringState, store_poll_seconds

logger = logging.getLogger("vllm.sae_steer")


class SteeringEndpoints:
    """The `vllm.endpoint_plugins` entry point (loaded when VLLM_PLUGINS names `sae_steer`)."""
    name = "sae_steer"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        for module in (completions, saes, vectors, captures, lens, playground):
            app.include_router(module.router)
        metrics.attach(app)  # sae-steer's series on vLLM's /metrics: the workers' slots read at each scrape

        @app.exception_handler(HTTPError)
        async def _(request: Request, exc: HTTPError):
            metrics.record_admin_refused(exc.response.status_code)  # only auth.require_admin raises HTTPError
            return exc.response

    async def init_state(self, engine_client, state, args) -> None:
        state.sae_steer = SteeringState(engine_client, args)
        metrics.init(engine_client, state.sae_steer.facts)
        state.sae_steer.store.follow(store_poll_seconds())  # vectors built or deleted by replicas sharing the store
        logger.info("sae-steer: HTTP endpoints ready (steering field, /v1/steering/*); admin routes %s; "
                    "runtime directory %s", "enabled" if state.sae_steer.admin_key else
                    "disabled (no --steering-admin-key-file)", state.sae_steer.runtime_dir)
