"""Eight simulated CPU devices for every test (must be set before jax is imported)."""

import atexit
import os
import shutil
import tempfile

# XLA's backend (LLVM) at -O0 for in-process tests: the same HLO passes, fusions, buffer assignment
# and library kernels (oneDNN, YNNPACK, Eigen), less time spent optimising the generated loops
# (a tiny sharded train step: 3.7 s to compile instead of 6.3; its elementwise loops run up to 2x
# slower). Tests compile hundreds of small programs and run each a few steps: the suite took 17:26
# instead of 25:19 on 2 cores. Subprocesses that set their own XLA_FLAGS (the timing-sensitive
# multi-process and kill tests), bench/ and every `bigjax` command a user runs keep XLA's level.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the measured CPU peak (bigjax.perf) is cached per test session, not in the user's ~/.cache
if "BIGJAX_CACHE_DIR" not in os.environ:
    os.environ["BIGJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="bigjax-cache-")
    atexit.register(shutil.rmtree, os.environ["BIGJAX_CACHE_DIR"], True)
# no compilation cache switched on for the rest of a worker by an in-process `cli.run(["train"...])`
# (tests that want one set it: tests/test_checkpoint.py, test_compile_cache.py)
os.environ.setdefault("BIGJAX_COMPILE_CACHE", "off")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests need 8 simulated devices; import jax after conftest"

# The test extra's torchvision (the ResNet reference) is, on machines whose only offline wheel is
# its CUDA build, unimportable next to the CPU torch, and transformers imports it when installed:
# declare its two missing operators first (tests/torchvision_ref.py), so both import.
from torchvision_ref import make_transformers_importable  # noqa: E402

make_transformers_importable()
