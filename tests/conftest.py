"""Test set-up: 8 forced host devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep tokenised-corpus caches inside the test session, never in the user's home.
os.environ.setdefault("LLM_JAX_CACHE", "/tmp/llm_jax_test_cache")
