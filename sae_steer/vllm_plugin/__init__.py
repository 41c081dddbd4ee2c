"""vLLM integration. `register` is the `vllm.general_plugins` entry point: it runs in every vLLM
process (API server, engine core, worker) before any model is built."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.sae_steer")


def register() -> None:
    # Model Runner V2 (CUDA default) refuses logits processors with the V1 interface, which is
    # our per-request channel; V2 is not available on CPU, so it cannot be tested here. Select V1.
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("sae-steer: selecting vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0); "
                    "its logits-processor interface carries per-request steering")
    elif os.environ["VLLM_USE_V2_MODEL_RUNNER"].lower() in ("1", "true"):
        logger.warning("sae-steer: VLLM_USE_V2_MODEL_RUNNER=1 is set; the V2 runner rejects sae-steer's "
                       "logits processor. Unset it to serve steering.")
    from sae_steer.vllm_plugin import frontend, steering_op
    steering_op.patch_decoder_layers()
    frontend.install()
    # In the API server: a `steering` field that reaches vLLM's own request models means our HTTP
    # endpoints are off; fail such requests (400) instead of silently serving them unsteered.
    from sae_steer.server.protocol import refuse_unhandled_steering
    refuse_unhandled_steering()
