"""Front-end (API / LLM process) side of the plugin, installed around vLLM's InputProcessor.

- records the engine's steering facts when the input processor is built, so that
  `SteeringLogitsProcessor.validate_params` can check requests against the served model;
  bad sae_steer settings fail here, loudly, at startup;
- takes the Steering that `validate_params` parsed at admission (inside process_inputs, same thread)
  and puts its plain form (`Steering.wire()`: "auto" resolved to calibrated numbers) on the request's
  own copy of its params: the worker parses that, and nothing in this process parses it again;
- salts the prefix cache of steered requests: a steered prompt's KV blocks depend on its
  steering, so they must never be shared with unsteered (or differently steered) requests.
"""
from __future__ import annotations

import functools
import threading

from sae_steer.spec import Steering
from sae_steer.vllm_plugin import facts

SALT_TAG = "sae_steer:"

# validate_params -> the process_inputs call it runs in: (the raw value it parsed, the Steering)
_admitted = threading.local()


def admit(raw, steering: Steering) -> None:
    _admitted.value = (raw, steering)


def steering_arg(params):
    """The `steering` value of a request's params (None for pooling params or no steering)."""
    extra = getattr(params, "extra_args", None)
    return extra.get("steering") if isinstance(extra, dict) else None


def install() -> None:
    from vllm.v1.engine.input_processor import InputProcessor
    if getattr(InputProcessor, "_sae_steer_installed", False):
        return
    init, process_inputs = InputProcessor.__init__, InputProcessor.process_inputs

    @functools.wraps(init)
    def __init__(self, vllm_config, *args, **kwargs):
        init(self, vllm_config, *args, **kwargs)
        facts.record(vllm_config)

    @functools.wraps(process_inputs)
    def steered_process_inputs(self, request_id, prompt, params, *args, **kwargs):
        _admitted.value = None
        request = process_inputs(self, request_id, prompt, params, *args, **kwargs)  # runs validate_params
        raw = steering_arg(params)
        if raw is None:
            return request
        admitted = _admitted.value
        _admitted.value = None
        if admitted is None or admitted[0] is not raw:  # never send steering that admission did not check
            raise RuntimeError("sae-steer: this request's steering was not checked at admission "
                               "(SteeringLogitsProcessor.validate_params did not run for it)")
        steering = admitted[1]
        # The request's own copy (vLLM cloned the caller's params): replace the dict, never edit it.
        own = request.sampling_params
        own.extra_args = {**own.extra_args, "steering": steering.wire()}
        request.cache_salt = f"{request.cache_salt or ''}|{SALT_TAG}{steering.fingerprint()}"
        return request

    InputProcessor.__init__, InputProcessor.process_inputs = __init__, steered_process_inputs
    InputProcessor._sae_steer_installed = True
