"""vLLM integration. `register` is the `vllm.general_plugins` entry point: it runs in every vLLM
process (API server, engine core, worker) before any model is built.

Installed but unused, the plugin changes nothing: it sets no environment variable, and each piece
it wraps checks for sae_steer settings first and otherwise returns vLLM's own result. The worker-side
wiring (op attachment, token map, startup check) is installed only by an engine that asks for steering.

Every vLLM internal it wraps is looked up defensively: if one has moved (another vLLM version),
`register` logs one line and disables the plugin, vLLM still starts, and an engine that asks for
steering refuses, naming the missing piece (wiring.py).
"""
from __future__ import annotations

from sae_steer.vllm_plugin.wiring import install


def register() -> None:
    from sae_steer.vllm_plugin import channel, engine_config, frontend
    install("the engine-config hooks", engine_config.install)
    install("the input-processor hooks", frontend.install)
    install("the logits-processor builder hook", channel.install_channel)
    # In the API server: a `steering` field that reaches vLLM's own request models means our HTTP
    # endpoints are off; fail such requests (400) instead of silently serving them unsteered.
    from sae_steer.server.protocol import refuse_unhandled_steering
    install("the request-model hooks", refuse_unhandled_steering)
