"""bigjax's native CPU kernels: compile them once (`python -m bigjax.kernels.native build`, which
scripts/setup.sh runs) and register them with XLA:CPU as FFI targets.

The one library today is oneDNN's convolutions (`onednn_conv.cc`, `model.conv_impl: onednn`),
linked against the `onednn-cpu-gomp` wheel (`pip install bigjax[onednn]`, x86-64 Linux), whose
`libdnnl.so` and headers land in the environment's `lib/` and `include/`. The library is built
next to `libdnnl.so` under a name that hashes its source and jaxlib's version, so an edited
source or another jaxlib never loads a stale build: it is rebuilt on first use instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jaxlib

log = logging.getLogger("bigjax")
SOURCE = Path(__file__).with_name("onednn_conv.cc")
TARGETS = ("bigjax_conv_fwd", "bigjax_conv_bwd_data", "bigjax_conv_bwd_weights")
BUILD_HINT = ("pip install 'bigjax[onednn]' (x86-64 Linux) and run "
              "`python -m bigjax.kernels.native build` (scripts/setup.sh does both; needs g++)")


def _prefix() -> Path:
    return Path(sys.prefix)


def library_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + jaxlib.__version__.encode()).hexdigest()[:12]
    return _prefix() / "lib" / f"bigjax_onednn_conv-{digest}.so"


def build() -> Path:
    """Compiles onednn_conv.cc against the installed oneDNN and jaxlib's FFI headers (a few
    seconds); written to a temporary name and renamed, so concurrent builds never load half a
    file. Raises RuntimeError (one line) when oneDNN or a C++ compiler is missing."""
    out = library_path()
    if out.exists():
        return out
    include, lib = _prefix() / "include", _prefix() / "lib"
    if not (include / "oneapi" / "dnnl" / "dnnl.hpp").exists() or not list(lib.glob("libdnnl.so*")):
        raise RuntimeError(f"oneDNN is not installed in {_prefix()}: {BUILD_HINT}")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError(f"no C++ compiler (g++) to build {SOURCE.name}: {BUILD_HINT}")
    with tempfile.NamedTemporaryFile(dir=lib, suffix=".so", delete=False) as tmp:
        pass
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-o", tmp.name, str(SOURCE),
           f"-I{include}", f"-I{jax.ffi.include_dir()}", f"-L{lib}", "-ldnnl",
           "-Wl,-rpath,$ORIGIN"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp.name)
        raise RuntimeError(f"building {SOURCE.name} failed: {done.stderr.strip()[-2000:]}")
    os.replace(tmp.name, out)
    return out


@functools.cache
def built() -> tuple[Path | None, str]:
    """(the library, "") once it is built, building it first where oneDNN is installed but this
    source or jaxlib has no build yet (an edited checkout, a new jaxlib); else (None, why)."""
    if library_path().exists():
        return library_path(), ""
    try:
        log.info("building %s (once per source and jaxlib)", SOURCE.name)
        return build(), ""
    except RuntimeError as e:
        return None, str(e)


@functools.cache
def onednn_conv() -> bool:
    """True once the convolution targets are registered with XLA:CPU (the library is built and
    loads); False where it cannot be built (`conv_impl: auto` then uses XLA's convolutions)."""
    path, _ = built()
    if path is None:
        return False
    lib = ctypes.cdll.LoadLibrary(str(path))
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return True


@functools.cache
def bfloat16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), where oneDNN's
    bfloat16 convolutions beat XLA's (a ResNet-18 step 3.0x faster on a Xeon with AMX); without
    them oneDNN converts or refuses, and bfloat16 stays on XLA's convolutions."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return "amx_bf16" in flags or "avx512_bf16" in flags


def main(argv: list[str]) -> int:
    if argv != ["build"]:
        print("usage: python -m bigjax.kernels.native build", file=sys.stderr)
        return 2
    try:
        print(build())
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
