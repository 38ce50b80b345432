"""Test set-up: 8 forced host devices and a shared compilation cache, set before JAX is imported
anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep tokenised-corpus caches inside the test session, never in the user's home.
os.environ.setdefault("LLM_JAX_CACHE", "/tmp/llm_jax_test_cache")
# JAX's persistent compilation cache, in the directory the CLI itself uses (run.compile_cache:
# <cache root>/xla, llm_jax.paths.enable_compile_cache), so in-process tests and the CLI
# subprocesses they start (which inherit this environment) load each other's compiled programs
# instead of compiling the same tiny models again. No size bound: JAX's evicting cache needs an
# access-time file beside every entry, which runs of the CLI outside the tests do not write.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["LLM_JAX_CACHE"], "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import gc  # noqa: E402 - after the environment above

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop each test module's compiled programs when it ends (the persistent cache above still
    has them for later modules): otherwise the one pytest process keeps every executable of the
    suite alive, and grew to 5.8 GB in CI."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", help="also run the long memory soak (tests marked soak)")


def pytest_collection_modifyitems(config, items):
    """The soak runs only when asked for (`pytest --soak -m soak`): it trains for minutes."""
    if config.getoption("--soak"):
        return
    kept = [item for item in items if "soak" not in item.keywords]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if "soak" in item.keywords])
        items[:] = kept
