"""Cache kernels: the Triton path (interpreted, ``TRITON_INTERPRET=1`` from conftest) and the
torch path (in its own process) against float64, bit-identity of the tensors they write,
determinism, input checks and the fallback when Triton breaks.

Why float64: both backends accumulate in fp32 in different orders, so each is compared with
the exact sums rather than with the other. Residuals and sums-with-residual are compared with
torch's own ``out - inp`` and ``x + r``, bit for bit, since a cache that replays residuals
must give what the uncached blocks would have given.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hidream_pack.kernels import dispatch, reference, triton_cache

SHAPES = [(1,), (7,), (1023,), (1025,), (65539,), (2, 130, 129)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _inputs(shape, dtype, count, contiguous, seed=0):
    """``count`` random tensors; strided ones are every other element of a wider tensor, and
    3-D ones are also transposed, so neither the last stride nor the dimension order is 1, 2, 3."""
    generator = torch.Generator().manual_seed(seed)
    if contiguous:
        return [torch.randn(shape, generator=generator).to(dtype) for _ in range(count)]
    # Cast before slicing: ``.to`` on a strided view would return a contiguous copy.
    tensors = [torch.randn((*shape, 2), generator=generator).to(dtype)[..., 1] for _ in range(count)]
    return [t.transpose(0, -1) for t in tensors] if len(shape) > 1 else tensors


def _sums64(cur, prev):
    return torch.stack(((cur.double() - prev.double()).abs().sum(), prev.double().abs().sum()))


def _assert_sums(sums, expected):
    assert sums.dtype == torch.float32 and sums.shape == (2,)
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-6)


def _bits(tensor):
    return tensor.contiguous().view(BITS[tensor.dtype])


def test_cpu_dispatch_uses_the_interpreter_when_asked():
    assert dispatch.interpreter_enabled()
    assert dispatch.choose_backend(torch.zeros(1)) == "triton"
    assert type(triton_cache._l1_partials_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_path_matches_float64_and_torch_bits(shape, dtype, contiguous):
    a, b, c = _inputs(shape, dtype, 3, contiguous)
    if not contiguous and a.numel() > 1:
        assert not a.is_contiguous()

    _assert_sums(dispatch.l1_sums(a, b), _sums64(a, b))

    residual, sums = dispatch.residual_and_l1(a, b, c)
    assert residual.dtype == dtype and residual.shape == a.shape
    assert torch.equal(_bits(residual), _bits(a - b))
    _assert_sums(sums, _sums64(residual, c))

    residual_only, none = dispatch.residual_and_l1(a, b, None)
    assert none is None
    assert torch.equal(_bits(residual_only), _bits(a - b))

    added = dispatch.add_residual(a, b)
    assert added.dtype == dtype and added.shape == a.shape
    assert torch.equal(_bits(added), _bits(a + b))


def _special_values(dtype):
    """Pairs whose fp32 sum hits rounding ties, subnormals, overflow, signed zeros and NaN."""
    info = torch.finfo(dtype)
    ulp_half = info.eps / 2  # half an ulp of 1.0 in this dtype
    x = [1 + 2 * ulp_half, 1.0, 1 + 6 * ulp_half, info.max, -info.max, math.inf, -math.inf, 0.0, -0.0]
    r = [ulp_half, ulp_half, ulp_half, info.max, -info.max, 1.0, 1.0, -0.0, -0.0]
    x += [info.tiny, info.tiny / 4, math.nan, 3.0, info.tiny * 3, 1e-30]
    r += [info.tiny / 3, info.tiny / 8, 1.0, 0.0, -info.tiny * 2.5, 1e-30]
    return torch.tensor(x).to(dtype), torch.tensor(r).to(dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow inside the interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rounding_of_special_values_is_bit_identical_to_torch(dtype):
    x, r = _special_values(dtype)
    assert torch.equal(_bits(dispatch.add_residual(x, r)), _bits(x + r))
    assert torch.equal(_bits(dispatch.residual_and_l1(x, r, None)[0]), _bits(x - r))


def test_bf16_tie_rounds_to_even_not_truncated():
    # 1 + 3/256 sits halfway between bf16 1 + 2/256 (odd) and 1 + 4/256 (even).
    x = torch.tensor([1 + 2 / 256], dtype=torch.bfloat16)
    r = torch.tensor([1 / 256], dtype=torch.bfloat16)
    assert dispatch.add_residual(x, r).item() == 1 + 4 / 256
    assert dispatch.residual_and_l1(x, -r, None)[0].item() == 1 + 4 / 256


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_results_are_deterministic(dtype):
    a, b, c = _inputs((65539,), dtype, 3, contiguous=True, seed=1)
    assert torch.equal(dispatch.l1_sums(a, b), dispatch.l1_sums(a, b))
    first, second = dispatch.residual_and_l1(a, b, c), dispatch.residual_and_l1(a, b, c)
    assert torch.equal(first[1], second[1]) and torch.equal(_bits(first[0]), _bits(second[0]))


def test_many_programs_and_a_multi_step_final_sum(monkeypatch):
    # 1024-element blocks give 65 partials; a 16-wide final sum needs 5 passes over them.
    monkeypatch.setattr(triton_cache, "_FINAL_BLOCK", 16)
    a, b, c = _inputs((65539,), torch.float32, 3, contiguous=True, seed=2)
    _assert_sums(triton_cache._l1_sums(a, b, 1024), _sums64(a, b))
    residual, sums = triton_cache._residual_and_l1(a, b, c, 1024)
    assert torch.equal(residual, a - b)
    _assert_sums(sums, _sums64(residual, c))
    assert torch.equal(triton_cache._add_residual(a, b, 1024), a + b)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_tensors_give_zero_sums(backend):
    empty = torch.empty(0, 3, dtype=torch.bfloat16)
    assert dispatch.l1_sums(empty, empty, backend=backend).tolist() == [0.0, 0.0]
    residual, sums = dispatch.residual_and_l1(empty, empty, empty, backend=backend)
    assert residual.shape == (0, 3) and sums.tolist() == [0.0, 0.0]
    assert dispatch.add_residual(empty, empty, backend=backend).shape == (0, 3)


def test_relative_l1_and_its_zero_denominator():
    cur = torch.tensor([1.0, 2.0, -3.0])
    prev = torch.tensor([1.0, 1.0, -1.0])
    assert dispatch.relative_l1(cur, prev) == 1.0  # (0 + 1 + 2) / 3
    assert dispatch.ratio(torch.tensor([3.0, 4.0])) == 0.75
    zero = torch.zeros(3)
    assert dispatch.relative_l1(zero, zero) == 0.0
    assert dispatch.relative_l1(cur, zero) == math.inf
    assert dispatch.ratio(torch.tensor([math.nan, 0.0])) == math.inf
    assert math.isnan(dispatch.ratio(torch.tensor([math.nan, 1.0])))


def _bad_calls():
    f32 = torch.zeros(4)
    meta = torch.zeros(4, device="meta")
    return [
        (lambda: dispatch.l1_sums(f32, torch.zeros(5)), ValueError, r"^l1_sums: shape mismatch.*\(4,\).*\(5,\)"),
        (lambda: dispatch.l1_sums(f32, f32.half()), ValueError, r"^l1_sums: dtype mismatch.*float16"),
        (lambda: dispatch.l1_sums(f32.double(), f32.double()), ValueError, r"^l1_sums: unsupported dtype torch.float64 for cur; allowed: float32, float16, bfloat16"),
        (lambda: dispatch.l1_sums(f32, meta), ValueError, r"^l1_sums: device mismatch: cur is on cpu, prev is on meta"),
        (lambda: dispatch.l1_sums(f32, [0.0] * 4), TypeError, r"^l1_sums: prev must be a torch.Tensor, got list"),
        (lambda: dispatch.residual_and_l1(f32, f32, torch.zeros(2, 2)), ValueError, r"^residual_and_l1: shape mismatch: out has \(4,\), prev_residual has \(2, 2\)"),
        (lambda: dispatch.residual_and_l1(f32.int(), f32.int(), None), ValueError, r"^residual_and_l1: unsupported dtype torch.int32 for out"),
        (lambda: dispatch.residual_and_l1(f32, f32, f32.bfloat16()), ValueError, r"^residual_and_l1: dtype mismatch: out is torch.float32, prev_residual is torch.bfloat16"),
        (lambda: dispatch.add_residual(f32.half(), f32), ValueError, r"^add_residual: dtype mismatch: x is torch.float16, residual is torch.float32"),
        (lambda: dispatch.add_residual(meta, f32), ValueError, r"^add_residual: device mismatch: x is on meta, residual is on cpu"),
        (lambda: dispatch.l1_sums(f32, f32, backend="cuda"), ValueError, r"^backend must be one of \('torch', 'triton'\) or None, got 'cuda'"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_raise_before_any_work(case):
    call, error, pattern = _bad_calls()[case]
    with pytest.raises(error, match=pattern):
        call()


@pytest.mark.parametrize("module", [reference, triton_cache], ids=["reference", "triton"])
def test_each_backend_checks_its_own_inputs(module):
    with pytest.raises(ValueError, match=r"^add_residual: shape mismatch"):
        module.add_residual(torch.zeros(3), torch.zeros(4))


def test_a_failing_kernel_falls_back_once_with_one_log_line(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(dispatch, "_triton_module", SimpleNamespace(l1_sums=broken))
    monkeypatch.setattr(dispatch, "_failed", set())
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])
    with caplog.at_level(logging.WARNING, logger=dispatch.logger.name):
        assert dispatch.l1_sums(a, b).tolist() == [2.0, 5.0]
        assert dispatch.l1_sums(a, b).tolist() == [2.0, 5.0]
    assert [r.getMessage() for r in caplog.records] == [
        "cache kernels: Triton l1_sums failed on cpu; using the torch reference from now on"
    ]
    with pytest.raises(RuntimeError, match="simulated compile failure"):
        dispatch.l1_sums(a, b, backend="triton")


def test_missing_triton_falls_back_unless_forced(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_module", None)
    monkeypatch.setattr(dispatch, "_triton_import_error", ImportError("No module named 'triton'"))
    x = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert dispatch.add_residual(x, x).tolist() == [2.0, -4.0]
    with pytest.raises(
        RuntimeError, match=r"^add_residual: backend='triton' requested but triton is unavailable"
    ):
        dispatch.add_residual(x, x, backend="triton")


def test_torch_path_in_a_process_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("_kernels_torch_path.py")
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"torch path OK: {len(SHAPES) * len(DTYPES) * 5} checks"
