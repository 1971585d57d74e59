"""XLA:CPU compiler options for bigjax's jitted steps: which kernel library runs what.

Convolutions on XLA's own (Eigen) kernels instead of YNNPACK's: jax 0.10's XLA:CPU hands each
convolution to YNNPACK, which ran ResNet-18's 32 x 32 x 64 convolutions on one thread of two (63 ms
forward, 77 ms input gradient at batch 64; Eigen: 39 and 43 ms on both cores) and was no faster
anywhere else; the whole CIFAR step went 2.32 -> 1.88 s. Reductions stay on YNNPACK.

Matrix products: on jax 0.10, in float32, on oneDNN (which XLA:CPU builds in, off by default),
which also takes the products YNNPACK leaves to Eigen (weight gradients contracting the batch);
whole steps alternated in one process: MiniLM finetune 0.99-1.11x (1.04x and 1.09x in the
longer runs), ResNet-18 1.08x, the decoder 0.93-1.07x, 2-8% less CPU time per step. Not in
bfloat16: there oneDNN's products kept more temporaries (gpt_tiny's step on 8 devices: 120 MB
against 77 MB planned; tests/test_plan.py). jax 0.12's YNNPACK is the faster one (MiniLM
1.05-1.18x over oneDNN), so there products stay on YNNPACK, as by default. A model without
convolutions on jax 0.12 compiles to XLA's default program.

An XLA that refuses an option set (a newer or older jaxlib) gets the next one, and finally none:
each is tried once on a tiny program, and a refusal is logged, never raised.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger("bigjax")

_YNN = "xla_cpu_experimental_ynn_fusion_type"
# YNNPACK keeps the kinds of fusion it has by default except convolutions
CONV_ON_EIGEN = {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# ... and gives its matrix products to oneDNN
DOTS_ON_ONEDNN = {_YNN: "LIBRARY_FUSION_TYPE_REDUCE", "xla_cpu_use_onednn": True,
                  "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def candidates(dtype: str) -> list[dict]:
    """Option sets in order of preference for this jax and a model computing in `dtype`."""
    if jax.__version_info__ < (0, 11) and dtype == "float32":
        return [DOTS_ON_ONEDNN, CONV_ON_EIGEN]
    return [CONV_ON_EIGEN]


@functools.cache
def compiler_options(dtype: str) -> dict | None:
    """The options for `jax.jit(..., compiler_options=...)` of a step computing in `dtype`
    (`model.dtype`) on this backend (None: XLA's own)."""
    if jax.default_backend() != "cpu":
        return None
    for options in candidates(dtype):
        try:
            jax.jit(lambda x: x @ x, compiler_options=options).lower(jnp.ones((2, 2))).compile()
            return dict(options)
        except Exception as e:  # an XLA without the option: try the next set
            log.warning("XLA:CPU refused compiler options %s (%s)", options,
                        str(e).splitlines()[0])
    log.warning("XLA:CPU took none of bigjax's compiler options: using XLA's defaults")
    return None


def convolutions_on_eigen(dtype: str) -> bool:
    """Whether bigjax's steps computing in `dtype` on CPU run convolutions on XLA's own Eigen
    kernels (not YNNPACK's): where XLA's stride-1 filter gradients are fast (models/conv.py)."""
    options = compiler_options(dtype)
    return options is not None and "CONVOLUTION" not in options.get(_YNN, "")
