"""Cache kernels: Triton kernels, their torch references, and one dispatch point.

Import from here (``from ..kernels import l1_sums``): these names are ``dispatch``'s, which
picks compiled Triton for CUDA tensors, the torch reference for CPU tensors (or triton's
interpreter when ``TRITON_INTERPRET=1``), and falls back to the reference if triton is missing
or a kernel fails to compile. Importing this package does not import triton.
"""

from .dispatch import (
    BACKENDS,
    Backend,
    add_residual,
    choose_backend,
    interpreter_enabled,
    l1_sums,
    ratio,
    relative_l1,
    residual_and_l1,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "add_residual",
    "choose_backend",
    "interpreter_enabled",
    "l1_sums",
    "ratio",
    "relative_l1",
    "residual_and_l1",
]
