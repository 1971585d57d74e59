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

# The test extra's torchvision (the ResNet reference) is, on machines whose only offline wheel is
# its CUDA build, unimportable next to the CPU torch, and transformers imports it when installed:
# declare its two missing operators first (tests/torchvision_ref.py), so both import.
from torchvision_ref import make_transformers_importable  # noqa: E402

make_transformers_importable()
