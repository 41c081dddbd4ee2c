"""Front-end (API / LLM process) side of the plugin, installed around vLLM's InputProcessor.

- records the engine's steering facts when the input processor is built, so that
  `SteeringLogitsProcessor.validate_params` can check requests against the served model;
  bad sae_steer settings fail here, loudly, at startup;
- resolves `"auto"` coefs/strengths to their calibrated numbers (calibration.py) on the request's copy
  of its params, so the worker sees numbers;
- salts the prefix cache of steered requests: a steered prompt's KV blocks depend on its
  steering, so they must never be shared with unsteered (or differently steered) requests.
"""
from __future__ import annotations

import functools
import hashlib
import json

from sae_steer.vllm_plugin import facts

SALT_TAG = "sae_steer:"


def steering_salt(steering) -> str:
    return SALT_TAG + hashlib.sha256(json.dumps(steering, sort_keys=True).encode()).hexdigest()[:32]


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
    def salted_process_inputs(self, *args, **kwargs):
        request = process_inputs(self, *args, **kwargs)  # validates the steering first
        params = request.sampling_params
        steering = (params.extra_args or {}).get("steering") if params is not None else None
        if steering is not None and facts.current() is not None:
            # "coef"/"strength": "auto" -> the calibrated numbers (calibration.py), on the request's own copy
            # (a shallow clone may share extra_args with the caller's params: replace the dict, not edit it)
            from sae_steer.calibration import resolve_auto
            resolved = resolve_auto(steering, facts.current().calibrations)
            if resolved is not steering:
                params.extra_args = {**params.extra_args, "steering": resolved}
                steering = resolved
        if steering is not None:
            request.cache_salt = f"{request.cache_salt or ''}|{steering_salt(steering)}"
        return request

    InputProcessor.__init__, InputProcessor.process_inputs = __init__, salted_process_inputs
    InputProcessor._sae_steer_installed = True
