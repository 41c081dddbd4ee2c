"""Request models of the HTTP extension: vLLM's own completion/chat requests plus three fields.

    steering   the same object as offline `extra_args["steering"]` (see the README)
    telemetry  {"sae": NAME, "top_k": K}: top-K active features of that SAE per generated token
    compare    true: also return the unsteered completion (same sampling settings and seed)

Over HTTP, vLLM's `vllm_xargs` takes only flat values, so these fields are declared here and
`to_sampling_params` carries them into `SamplingParams.extra_args` as structured objects.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from sae_steer.vllm_plugin.observers import TELEMETRY_KEY  # set by the server, never by the client

STEERING_DOC = ("Per-request steering: {\"interventions\": [...], \"positions\": \"all|prompt|generated\"}. "
                "Interventions: {\"type\": \"sae\", \"sae\", \"feature\", \"mode\": add|clamp|ablate|scale, "
                "\"strength\"|\"value\"|\"factor\", \"when\": {\"feature\", \"above\"}} or "
                "{\"type\": \"vector\", \"vector\"|\"values\"+\"layer\", \"coef\"}.")
TELEMETRY_DOC = "{\"sae\": NAME, \"top_k\": K}: the top-K active features of that SAE for every generated token."
COMPARE_DOC = "Also return the unsteered completion, with the same sampling settings and seed, under `unsteered`."


def reserved_xarg(request) -> str | None:
    """The first `vllm_xargs` key a client may not set: `steering` and the plugin's internal `sae_steer_*`
    keys go into extra_args unchecked by vLLM, so only the server may put them there."""
    for key in sorted(getattr(request, "vllm_xargs", None) or {}):
        if key == "steering" or key.startswith("sae_steer_"):
            return key
    return None


def _refuse_reserved_xarg(request) -> None:
    key = reserved_xarg(request)
    if key is not None:
        from vllm.exceptions import VLLMValidationError
        raise VLLMValidationError(f"vllm_xargs.{key}: reserved for sae-steer's server; send steering as the "
                                  "top-level `steering` field", parameter=f"vllm_xargs.{key}")


class SteeringFields(BaseModel):
    """The three fields, mixed into vLLM's request models (pydantic merges the fields)."""
    steering: Any = Field(default=None, description=STEERING_DOC)  # any JSON: parse_steering names bad fields
    telemetry: Any = Field(default=None, description=TELEMETRY_DOC)
    compare: bool = Field(default=False, description=COMPARE_DOC)

    def to_sampling_params(self, *args, **kwargs):
        _refuse_reserved_xarg(self)  # the routes check first (endpoints._check); this is the backstop
        params = super().to_sampling_params(*args, **kwargs)
        extra = dict(params.extra_args or {})
        if self.steering is not None:
            extra["steering"] = self.steering
        if self.telemetry is not None:
            extra[TELEMETRY_KEY] = self.telemetry
        params.extra_args = extra or None
        return params


class SteeredCompletionRequest(SteeringFields, CompletionRequest):
    pass


class SteeredChatCompletionRequest(SteeringFields, ChatCompletionRequest):
    pass


def refuse_unhandled_steering() -> None:
    """Installed by the general plugin in the API process: if a request still carries `steering`
    in vLLM's own request models, our endpoints are not active, and serving it would silently
    ignore the steering. Fail it with 400 instead."""
    from vllm.exceptions import VLLMValidationError
    for cls in (CompletionRequest, ChatCompletionRequest):
        if getattr(cls, "_sae_steer_guard", False):
            continue
        original = cls.to_sampling_params

        def guarded(self, *args, _original=original, **kwargs):
            stray = {"steering", "telemetry", "compare"} & set(self.model_extra or {})
            if stray:
                field = sorted(stray)[0]
                raise VLLMValidationError(
                    f"{field}: this server does not have sae-steer's HTTP endpoints enabled, so `{field}` would be "
                    "ignored; start it with `sae-steer serve` or set VLLM_PLUGINS to include sae_steer",
                    parameter=field)
            _refuse_reserved_xarg(self)
            return _original(self, *args, **kwargs)

        cls.to_sampling_params = guarded
        cls._sae_steer_guard = True
