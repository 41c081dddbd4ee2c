"""sae-steer: per-request SAE-feature and CAA steering inside batched vLLM serving.

The core (spec, sae, edits, formats, registry) is plain torch; vLLM is imported only by
`sae_steer.vllm_plugin`.
"""
__version__ = "0.1.0"
