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
_current_full_graphs = False


def settings_of(config) -> Settings | None:
    return Settings.from_additional_config(config.additional_config)


def facts_for(config) -> ModelFacts | None:
    """ModelFacts of an engine config; None when it has no sae_steer settings. Raises on bad settings."""
    raw = (config.additional_config or {}).get(SETTINGS_KEY)
    if raw is None:
        return None
    from sae_steer.vllm_plugin import adapters, require_complete
    require_complete()
    adapters.family_of(config.model_config.architectures)  # an unknown family is refused by name
    model = config.model_config
    facts = _facts(json.dumps(raw, sort_keys=True), model.get_hidden_size(), model.get_total_num_hidden_layers())
    parallel = config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        # Logit steering reads the whole unembedding in the worker; a sharded or last-stage-only LM head
        # would need collectives that are not written (yet).
        return dataclasses.replace(facts, logit_refusal=(
            f"logit interventions need tensor and pipeline parallel size 1 (this engine runs "
            f"{parallel.tensor_parallel_size} x {parallel.pipeline_parallel_size}); steer the residual stream "
            f"with a `sae` intervention instead"))
    return facts


@functools.lru_cache(maxsize=8)
def _facts(settings_json: str, d_model: int, num_layers: int) -> ModelFacts:
    settings = Settings.from_additional_config({SETTINGS_KEY: json.loads(settings_json)})
    return settings.model_facts(d_model, num_layers)


def record(config) -> None:
    global _current, _current_settings, _current_full_graphs
    from sae_steer.vllm_plugin.engine_config import full_graphs
    _current = facts_for(config)
    _current_settings = settings_of(config)
    _current_full_graphs = _current is not None and full_graphs(config)


def current() -> ModelFacts | None:
    return _current


def current_settings() -> Settings | None:
    return _current_settings


def current_full_graphs() -> bool:
    """Does the engine this process serves replay steering from full CUDA graphs (no telemetry/capture)?"""
    return _current_full_graphs
