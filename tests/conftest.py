"""Eight simulated CPU devices for every test (must be set before jax is imported)."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the measured CPU peak (bigjax.perf) is cached per test session, not in the user's ~/.cache
if "BIGJAX_CACHE_DIR" not in os.environ:
    os.environ["BIGJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="bigjax-cache-")
    atexit.register(shutil.rmtree, os.environ["BIGJAX_CACHE_DIR"], True)

import jax  # noqa: E402

assert jax.device_count() == 8, "tests need 8 simulated devices; import jax after conftest"
