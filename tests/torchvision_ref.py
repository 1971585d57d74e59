"""torchvision for reference checks, importable where its compiled ops are not.

The only torchvision wheel this project's machines can install (0.28.0, matching torch 2.13.0) is
a CUDA build, whose `_C` extension cannot load next to the CPU torch; torchvision 0.28 then fails
at import on two unguarded fake-kernel registrations (`torchvision::nms`, `qnms`). The models
(pure torch.nn) need none of its compiled ops, so when that happens the two operator schemas are
declared and the import retried. A working install imports at the first try, untouched.
"""

from __future__ import annotations

import sys


def import_torchvision():
    import torch
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision.lib = lib  # a Library undoes its definitions when collected
        import torchvision
    return torchvision


def make_transformers_importable() -> None:
    """transformers imports torchvision whenever it is installed: make that import work (a no-op
    without torch or torchvision). tests/conftest.py and the benches that build PyTorch models
    call this first."""
    try:
        import_torchvision()
    except ImportError:
        pass
