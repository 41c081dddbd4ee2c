"""The OpenAI-compatible HTTP extension (installed as sae_steer.server)."""
