"""XLA:CPU compiler options for bigjax's jitted steps: convolutions on XLA's own (Eigen) kernels
instead of YNNPACK's.

Why: jax 0.10's XLA:CPU hands each convolution to YNNPACK, which ran ResNet-18's 32 x 32 x 64
convolutions on one thread of two (63 ms forward, 77 ms input gradient at batch 64; Eigen: 39 and
43 ms on both cores) and was no faster anywhere else; the whole CIFAR step went 2.32 -> 1.88 s
(medians, bench/resnet_vs_torchvision.py's network). Matrix products and reductions stay on
YNNPACK, as by default, so a model without convolutions compiles to the same program.

An XLA that does not know the option (a newer or older jaxlib) gets none: the options are tried
once on a tiny program, and a refusal is logged, never raised.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger("bigjax")

# YNNPACK keeps the kinds of fusion it has by default except convolutions
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """The options for `jax.jit(..., compiler_options=...)` on this backend (None: XLA's own)."""
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(lambda x: x.sum(), compiler_options=CPU_OPTIONS).lower(jnp.ones(2)).compile()
    except Exception as e:  # an XLA without the option: compile as XLA chooses
        log.warning("XLA:CPU refused bigjax's compiler options (%s): using XLA's defaults",
                    str(e).splitlines()[0])
        return None
    return dict(CPU_OPTIONS)
