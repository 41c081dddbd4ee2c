"""The served model's steering facts (registered SAEs/vectors, steerable layers), from a VllmConfig.

`validate_params` of a logits processor is a classmethod that sees only the request, so the
front-end process records the facts of the engine it serves when vLLM builds its input
processor (see `frontend.py`); workers compute the same facts from their own config.
"""
from __future__ import annotations

import dataclasses
import functools
import json

from sae_steer.registry import SETTINGS_KEY, Settings
from sae_steer.spec import ModelFacts

_current: ModelFacts | None = None  # the facts of the engine this process serves (front end)
_current_settings: Settings | None = None
_current_observe_refusal: str | None = None  # why telemetry / capture are refused here


def settings_of(config) -> Settings | None:
    return Settings.from_additional_config(config.additional_config)


def facts_for(config) -> ModelFacts | None:
    """ModelFacts of an engine config; None when it has no sae_steer settings. Raises on bad settings."""
    raw = (config.additional_config or {}).get(SETTINGS_KEY)
    if raw is None:
        return None
    from sae_steer.vllm_plugin import adapters, engine_options
    from sae_steer.vllm_plugin.wiring import require_complete
    require_complete()
    adapters.family_of(config.model_config.architectures)  # an unknown family is refused by name
    engine_options.refuse_unsupported(config)
    from vllm.platforms import current_platform
    model = config.model_config
    # the budget counts the steering table's copy of the SAEs where it is held in the serving dtype (a GPU)
    facts = _facts(json.dumps(raw, sort_keys=True), model.get_hidden_size(), model.get_total_num_hidden_layers(),
                   current_platform.is_cuda_alike(), model.dtype)
    refusal = engine_options.logit_refusal(config)
    return facts if refusal is None else dataclasses.replace(facts, logit_refusal=refusal)


@functools.lru_cache(maxsize=8)
def _facts(settings_json: str, d_model: int, num_layers: int, cuda: bool, model_dtype) -> ModelFacts:
    settings = Settings.from_additional_config({SETTINGS_KEY: json.loads(settings_json)})
    return settings.model_facts(d_model, num_layers, settings.packed_weight_dtype(cuda, model_dtype))


def record(config) -> None:
    global _current, _current_settings, _current_observe_refusal
    from sae_steer.vllm_plugin.engine_options import observe_refusal
    _current = facts_for(config)
    _current_settings = settings_of(config)
    _current_observe_refusal = observe_refusal(config) if _current is not None else None


def current() -> ModelFacts | None:
    return _current


def current_settings() -> Settings | None:
    return _current_settings


def current_observe_refusal() -> str | None:
    """Why the engine this process serves cannot run telemetry and capture (full CUDA graphs, speculative
    decoding), or None."""
    return _current_observe_refusal
