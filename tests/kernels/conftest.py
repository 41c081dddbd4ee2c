"""Kernel tests run the Triton kernels for real on a GPU, and in Triton's interpreter (numpy, on CPU)
everywhere else. Without a usable triton the whole directory is skipped, with the reason.

Triton reads TRITON_INTERPRET when a function is decorated with @triton.jit, at import, and that includes
its own standard library (tl.sum, tl.cdiv): the variable must be set before triton is first imported in
the process, and it must stay set (triton reads it again at the first launch). Without a GPU it is set
here, for the session; triton runs no kernel on CPU otherwise, so nothing else changes behaviour.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

SKIP_REASON = None
interpret = not torch.cuda.is_available()
if interpret and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    SKIP_REASON = ("triton was imported before tests/kernels/conftest.py could turn on its interpreter (no GPU "
                   "here); run `TRITON_INTERPRET=1 pytest tests/kernels`")
else:
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        SKIP_REASON = f"triton is not importable ({e}); install it (pip install triton) to test the kernels"


def pytest_collection_modifyitems(config, items):
    if SKIP_REASON:
        here = os.path.dirname(__file__)
        for item in items:
            if str(item.path).startswith(here):
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
