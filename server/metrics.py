"""sae-steer's Prometheus metrics, on the /metrics endpoint vLLM's API server already serves.

Named and registered the way vLLM registers its own front-end metrics (vllm/parser/metrics.py): the
`vllm:` prefix, a `model_name` label (the served model name), prometheus_client objects in the default
registry, counters ending in `_total`, and gauges with a `multiprocess_mode`, so that with several API
server processes (vLLM then collects every process's values from PROMETHEUS_MULTIPROC_DIR) counters
are summed over the processes and gauges combined as their mode says.

The routes record through module functions (record_*), which do nothing before `init` (no server).
The worker's slot counts come from sae_steer.vllm_plugin.slot_stats: read when /metrics is requested
(an ASGI middleware refreshes the slot gauges just before vLLM's handler collects), so a scrape shows
what the workers' tables hold at that moment, in one or several API server processes alike. Not a custom
Collector: with several API servers vLLM's /metrics collects only PROMETHEUS_MULTIPROC_DIR, never the
default registry's collectors; the slot gauges' mode is `mostrecent`, and the process that answers the
scrape has just set them.

Label values come from closed sets (intervention types, outcomes, the steering object's own field
names), never from a client's text, so the number of series is bounded.
"""
from __future__ import annotations

import functools
import re
from http import HTTPStatus
from typing import get_args

from fastapi import FastAPI
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from starlette.responses import Response

from sae_steer.spec import LogitIntervention, SaeIntervention, VectorIntervention, When
from sae_steer.vllm_plugin import slot_stats

INTERVENTION_TYPES = tuple(f"sae_{mode}" for mode in get_args(SaeIntervention.model_fields["mode"].annotation)) + (
    "vector", "logit")
OUTCOMES = ("succeeded", "failed", "refused")
ADMIN_REFUSALS = {HTTPStatus.FORBIDDEN: "disabled", HTTPStatus.UNAUTHORIZED: "unauthorized"}
TELEMETRY_FIELDS = ("sae", "top_k")  # spec.parse_telemetry's fields


def _refusal_fields() -> frozenset[str]:
    """Every field a steering 400 can name, with list indices removed: the steering object's own fields."""
    fields = {"steering", "steering.interventions", "steering.positions", "telemetry", "compare", "vllm_xargs"}
    for model in (SaeIntervention, VectorIntervention, LogitIntervention):
        fields.update(f"steering.interventions.{name}" for name in model.model_fields)
    fields.update(f"steering.interventions.when.{name}" for name in When.model_fields)
    fields.update(f"telemetry.{name}" for name in TELEMETRY_FIELDS)
    return frozenset(fields)


REFUSAL_FIELDS = _refusal_fields()


def refusal_field(field: str) -> str:
    """The `field` label of a steering 400: the SteeringError's field without list indices, `telemetry` and
    `compare` named alike inside `steering` or at the top level; a field the client made up (an unknown key)
    is named by the nearest known field above it, so the label takes one of REFUSAL_FIELDS' values."""
    path = re.sub(r"\[\d+\]", "", field)
    if path.startswith(("steering.telemetry", "steering.compare")):
        path = path[len("steering."):]
    if path.startswith("vllm_xargs."):  # vllm_xargs.<the client's key>
        return "vllm_xargs"
    while path not in REFUSAL_FIELDS and "." in path:
        path = path.rsplit(".", 1)[0]
    return path if path in REFUSAL_FIELDS else "other"


def intervention_types(steering) -> set[str]:
    """The intervention types of a parsed Steering (one of INTERVENTION_TYPES each)."""
    return {f"sae_{iv.mode}" if isinstance(iv, SaeIntervention) else iv.type for iv in steering.interventions}


class SteeringMetrics:
    def __init__(self, model_name: str, facts, registry: CollectorRegistry = REGISTRY):
        self.model_name = model_name
        labels = {"model_name": model_name}

        def counter(name, doc, *names):
            return Counter(f"vllm:sae_steer_{name}", doc, ["model_name", *names], registry=registry)

        def gauge(name, doc, mode, *names):
            return Gauge(f"vllm:sae_steer_{name}", doc, ["model_name", *names], registry=registry,
                         multiprocess_mode=mode)

        self.steered = counter("requests_steered_total", "Steered completion requests admitted, counted once "
                               "for each intervention type a request holds.", "intervention_type")
        self.refused = counter("requests_refused_total", "Completion requests refused with 400 by steering "
                               "validation, by the field the error names (list indices removed).", "field")
        self.admin_refused = counter("admin_requests_refused_total", "Admin-route requests refused: 'disabled' "
                                     "(403, no admin key configured) or 'unauthorized' (401, missing or wrong "
                                     "key).", "reason")
        self.routes = {
            "caa_builds": (counter("caa_builds_total", "CAA vector builds (POST /v1/steering/vectors) by outcome: "
                                   "succeeded, failed (5xx: captures missing, or an error), refused (4xx).",
                                   "outcome"),
                           gauge("caa_builds_running", "CAA vector builds in progress.", "livesum")),
            "captures": (counter("captures_total", "Activation captures (POST /v1/steering/captures) by "
                                 "outcome: succeeded, failed (5xx), refused (4xx).", "outcome"),
                         gauge("captures_running", "Activation captures in progress.", "livesum")),
        }
        self.slots_in_use = gauge("slots_in_use", "Steering slots held in the workers' tables (requests with "
                                  "identical steering share one), summed over engines; table: residual "
                                  "(SAE edits and vectors) or logit.", "mostrecent", "table")
        self.slots_limit = gauge("slots_limit", "Steering slots the workers' tables have (max_num_seqs per "
                                 "engine), summed over engines.", "mostrecent", "table")
        sae_info = gauge("sae_info", "A registered SAE (value 1).", "mostrecent",
                         "sae", "layer", "architecture", "d_sae")
        vector_info = gauge("vector_info", "A vector registered in the server's config (value 1); layers: "
                            "comma-separated.", "mostrecent", "vector", "layers")
        config_info = gauge("config_info", "The served steering settings (value 1); steerable_layers: "
                            "comma-separated.", "mostrecent", "steerable_layers", "max_interventions",
                            "max_abs_value")
        for kind in INTERVENTION_TYPES:  # present from the start, at 0, as vLLM's own counters are
            self.steered.labels(**labels, intervention_type=kind)
        for reason in ADMIN_REFUSALS.values():
            self.admin_refused.labels(**labels, reason=reason)
        for total, running in self.routes.values():
            running.labels(**labels)
            for outcome in OUTCOMES:
                total.labels(**labels, outcome=outcome)
        for name, sae in sorted(facts.saes.items()):
            sae_info.labels(**labels, sae=name, layer=str(sae.layer), architecture=sae.architecture,
                            d_sae=str(sae.d_sae)).set(1)
        for name, layers in sorted(facts.vectors.items()):
            vector_info.labels(**labels, vector=name, layers=",".join(map(str, sorted(layers)))).set(1)
        config_info.labels(**labels, steerable_layers=",".join(map(str, sorted(facts.steerable_layers))),
                           max_interventions=str(facts.max_interventions),
                           max_abs_value=f"{facts.max_abs_value:g}").set(1)

    def refresh_slots(self) -> None:
        """The workers' slot counts as they are now (none published yet: no series)."""
        published = slot_stats.read_published()
        if not published:
            return
        for table, in_use, limit in (("residual", sum(c.residual_in_use for c in published),
                                      sum(c.residual_limit for c in published)),
                                     ("logit", sum(max(c.logit_in_use, 0) for c in published),
                                      sum(max(c.logit_limit, 0) for c in published))):
            if table == "logit" and all(c.logit_limit < 0 for c in published):
                continue  # no engine serves logit interventions
            self.slots_in_use.labels(model_name=self.model_name, table=table).set(in_use)
            self.slots_limit.labels(model_name=self.model_name, table=table).set(limit)


_metrics: SteeringMetrics | None = None


def init(engine_client, facts) -> None:
    """Register this API server's metrics (endpoints.init_state)."""
    global _metrics
    _metrics = SteeringMetrics(str(engine_client.vllm_config.model_config.served_model_name), facts)


def attach(app: FastAPI) -> None:
    """Refresh the slot gauges from the workers whenever /metrics is requested (endpoints.attach_router)."""
    app.add_middleware(_RefreshSlotsOnScrape)


class _RefreshSlotsOnScrape:
    """ASGI middleware: before a request for /metrics reaches vLLM's handler, read the workers' slot counts.
    Other requests pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if _metrics is not None and scope["type"] == "http" and scope["path"].rstrip("/") == "/metrics":
            _metrics.refresh_slots()  # a few 32-byte reads of the runtime directory
        await self.app(scope, receive, send)


def record_steered(steering) -> None:
    """A steered completion request passed validation (steering: the Admitted object, or None: unsteered)."""
    if _metrics is not None and steering is not None:
        for kind in intervention_types(steering.steering):
            _metrics.steered.labels(model_name=_metrics.model_name, intervention_type=kind).inc()


def record_refused(field: str) -> None:
    """A completion request answered 400 by steering validation, naming `field`."""
    if _metrics is not None:
        _metrics.refused.labels(model_name=_metrics.model_name, field=refusal_field(field)).inc()


def record_admin_refused(status: int) -> None:
    """An admin route refused for its key (auth.require_admin's 403 or 401)."""
    if _metrics is not None and status in ADMIN_REFUSALS:
        _metrics.admin_refused.labels(model_name=_metrics.model_name, reason=ADMIN_REFUSALS[status]).inc()


def counted(route: str):
    """Decorates an admin route ("caa_builds" or "captures"): counts its outcome (by the status it answers;
    an exception is a failure) and the calls in progress."""
    def decorate(endpoint):
        @functools.wraps(endpoint)  # FastAPI reads the endpoint's signature through __wrapped__
        async def wrapper(*args, **kwargs):
            if _metrics is None:
                return await endpoint(*args, **kwargs)
            total, running = _metrics.routes[route]
            labels = {"model_name": _metrics.model_name}
            outcome = "failed"
            running.labels(**labels).inc()
            try:
                result = await endpoint(*args, **kwargs)
                status = result.status_code if isinstance(result, Response) else HTTPStatus.OK
                outcome = "failed" if status >= 500 else "refused" if status >= 400 else "succeeded"
                return result
            finally:
                running.labels(**labels).dec()
                total.labels(**labels, outcome=outcome).inc()
        return wrapper
    return decorate
