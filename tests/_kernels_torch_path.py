"""Checks the kernels' torch path in a process where ``TRITON_INTERPRET`` is not set.

Run by ``tests/test_kernels.py`` in a subprocess: the test session sets ``TRITON_INTERPRET=1``
before anything imports triton, and once triton is imported that choice cannot be undone, so
the CPU dispatch to torch can only be seen in a fresh process. Only the ``kernels``
subpackage is loaded (by path, under the tests' module name, without running the pack's
``__init__``, which imports diffusers and with it triton), so the script can also check that
the torch path never imports triton. Prints ``torch path OK: N checks`` on success.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import torch

PACK_ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(1,), (7,), (1023,), (1025,), (65539,), (2, 130, 129)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _load_kernels() -> types.ModuleType:
    package = types.ModuleType("hidream_pack")
    package.__path__ = [str(PACK_ROOT)]
    sys.modules["hidream_pack"] = package
    return importlib.import_module("hidream_pack.kernels")


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {what}")


def _sums64(cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    return torch.stack(((cur.double() - prev.double()).abs().sum(), prev.double().abs().sum()))


def _close(sums: torch.Tensor, expected: torch.Tensor) -> bool:
    return sums.dtype == torch.float32 and torch.allclose(sums.double(), expected, rtol=1e-5, atol=1e-6)


def main() -> None:
    _expect("TRITON_INTERPRET" not in os.environ, "TRITON_INTERPRET must be unset for this script")
    kernels = _load_kernels()
    generator = torch.Generator().manual_seed(0)
    checks = 0
    for shape in SHAPES:
        for dtype in DTYPES:
            # Strided views: the torch path must accept non-contiguous inputs too.
            a, b, c = (torch.randn((*shape, 2), generator=generator)[..., 0].to(dtype) for _ in range(3))
            _expect(kernels.choose_backend(a) == "torch", f"dispatch chose torch for {shape} {dtype}")
            _expect(_close(kernels.l1_sums(a, b), _sums64(a, b)), f"l1_sums {shape} {dtype}")
            residual, sums = kernels.residual_and_l1(a, b, c)
            _expect(torch.equal(residual, a - b), f"residual bits {shape} {dtype}")
            _expect(_close(sums, _sums64(residual, c)), f"residual sums {shape} {dtype}")
            _expect(kernels.residual_and_l1(a, b, None)[1] is None, f"no prev gives None {shape} {dtype}")
            _expect(torch.equal(kernels.add_residual(a, b), a + b), f"add bits {shape} {dtype}")
            checks += 5
    _expect("triton" not in sys.modules, "the torch path imported triton")
    print(f"torch path OK: {checks} checks")


if __name__ == "__main__":
    main()
