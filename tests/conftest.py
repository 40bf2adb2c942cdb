"""Test setup: 8 fake CPU devices so sharded code paths are exercised on a laptop/CI box.

Must run before JAX initialises its backends, hence module level in conftest.
"""

import os

# Tiny test models run fast at any optimisation level; compiling them is the suite's main cost.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mesh():
    """The 1-D ``data`` mesh over all 8 fake devices (sharded-loss and memory-bank tests)."""
    import jax

    from vlp_jax.parallel.mesh import make_mesh

    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    return make_mesh((8,))


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory):
    """One cache dir per test session: the tiny built-in catalog and its TFDS build are shared."""
    return str(tmp_path_factory.mktemp("vlp_cache"))


@pytest.fixture(scope="session")
def make_tiny_config(data_cache_dir):
    """A factory of fresh tiny configs, for module-scoped fixtures (``tiny_config`` is per test)."""

    def make():
        from tiny_configs import tiny_test_config

        return tiny_test_config(data_cache_dir)

    return make


@pytest.fixture()
def tiny_config(make_tiny_config):
    """configs/tiny.py shrunk further for unit-level end-to-end tests (seconds, not minutes)."""
    return make_tiny_config()


def pytest_configure(config):
    """Share compiled programs across the many tiny runs of the suite (same shapes recur)."""
    import tempfile

    from vlp_jax.runtime import devices as runtime

    # One cache for the controller and every xdist worker (they inherit the environment): the
    # tiny train step and eval programs recur across files that run on different workers.
    cache_dir = os.environ.setdefault("VLP_JAX_TEST_XLA_CACHE",
                                      tempfile.mkdtemp(prefix="vlp_xla_cache_"))
    runtime.enable_compilation_cache(cache_dir)


# Slowest files first (measured with --durations): with `-n 2 --dist loadfile` (make test) a file
# runs on one worker, so starting the long ones early (longest first) keeps both workers busy to
# the end.
_SLOW_FILES_FIRST = (
    "test_multiprocess.py", "test_faults.py", "test_train.py", "test_mpm_teacher.py",
    "test_serve_server.py", "test_grad_accum.py", "test_train_step.py", "test_skip_resume.py",
    "test_storage_faults.py", "test_layout.py", "test_mfu.py", "test_mbns_recipe.py",
    "test_serve_export.py", "test_zh_catalog.py",
)


def pytest_collection_modifyitems(config, items):
    """Stable reorder: the files above first, in that order; the rest as collected."""
    rank = {name: i for i, name in enumerate(_SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def gcs():
    """A GCS emulator on 127.0.0.1 for this test session, this process pointed at it."""
    from object_stores import export_env, start_gcs

    store = start_gcs()
    export_env(store)
    yield store
    store.stop()


@pytest.fixture(scope="session")
def s3():
    """A SeaweedFS S3 server on 127.0.0.1 (credentials enforced), this process pointed at it."""
    from object_stores import export_env, start_s3

    store = start_s3()
    export_env(store)
    yield store
    store.stop()
