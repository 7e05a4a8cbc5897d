"""Cache kernels: the torch composition vs the Triton kernels, side by side in one run.

On CUDA, each kernel is timed at 4096x2560 bf16 (an image-token activation of HiDream-I1 at
1024x1024) through the dispatch point with the backend forced, with ``triton.testing.do_bench``
(median, L2 flushed between calls). Bandwidth counts the bytes each kernel must move at least
(reads + writes of the full tensors), for both backends, so GB/s ratios equal speedups.

Without CUDA the compiled kernels cannot run: the script says so, times the torch reference
at the full size on the CPU, and runs the same table through triton's interpreter at a small
size (a correctness tool, far slower than anything real; its figures are not a claim).

    python bench/cache_kernels.py [--peak-gbps 3350] [--rows 4096 --cols 2560] [--dtype bf16]

Last line on CUDA (the README's figures):
    card=<name> l1_speedup=<x> l1_pct_peak=<%> residual_l1_speedup=<x> residual_l1_pct_peak=<%>
Last line on the CPU (not performance figures; ``skipped`` without the interpreter):
    cpu_l1_ms=<torch, full size> cpu_residual_l1_ms=<torch, full size>
    interp_l1_ratio=<interpreter / torch time> interp_residual_l1_ratio=<interpreter / torch time>

``--smoke``: 64x64, 1 repeat (CUDA: the same do_bench timing). CI runs it so the benchmark
cannot silently stop working; its numbers are not figures.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _common import load_pack, min_time, setup_threads

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One kernel call and the tensors it must read and write at least."""

    name: str
    tensors_moved: int  # full-size tensors read + written
    call: Callable[[str], object]  # backend -> result


def make_cases(kernels, rows: int, cols: int, dtype: torch.dtype, device: str) -> list[Case]:
    g = torch.Generator(device=device).manual_seed(0)
    inp, out, prev = (torch.randn(rows, cols, generator=g, device=device).to(dtype) for _ in range(3))
    return [
        Case("l1_sums", 2, lambda b: kernels.l1_sums(out, inp, backend=b)),
        Case("residual_and_l1", 4, lambda b: kernels.residual_and_l1(out, inp, prev, backend=b)),
        Case("residual (no prev)", 3, lambda b: kernels.residual_and_l1(out, inp, None, backend=b)),
        Case("add_residual", 3, lambda b: kernels.add_residual(inp, prev, backend=b)),
    ]


def check_agreement(case: Case) -> str:
    """Tensors must match torch bit for bit; sums to fp32 accumulation-order rounding."""
    torch_result, triton_result = case.call("torch"), case.call("triton")
    if isinstance(torch_result, tuple):
        same = torch.equal(torch_result[0], triton_result[0])
        sums = (torch_result[1], triton_result[1])
    elif torch_result.shape == (2,):
        same, sums = True, (torch_result, triton_result)
    else:
        same, sums = torch.equal(torch_result, triton_result), (None, None)
    if sums[0] is not None:
        same = same and torch.allclose(sums[0], sums[1], rtol=1e-4)
    return "ok" if same else "MISMATCH"


def cuda_timer(fn: Callable[[], object]) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def cpu_timer(repeats: int) -> Callable[[Callable[[], object]], float]:
    return lambda fn: min_time(fn, repeats)


def run_table(
    cases: list[Case], backends: tuple[str, ...], numel: int, itemsize: int, timer, peak_gbps: float | None
) -> dict[tuple[str, str], tuple[float, float]]:
    """Print one row per (kernel, backend); return {(kernel, backend): (seconds, GB/s)}."""
    print(f"{'kernel':<20}{'backend':<9}{'ms':>9}{'GB/s':>9}{'% peak':>8}{'vs torch':>10}  check")
    results: dict[tuple[str, str], tuple[float, float]] = {}
    for case in cases:
        check = check_agreement(case) if len(backends) == 2 else "-"
        for backend in backends:
            seconds = timer(lambda case=case, backend=backend: case.call(backend))
            gbps = case.tensors_moved * numel * itemsize / seconds / 1e9
            results[(case.name, backend)] = (seconds, gbps)
            pct = f"{100 * gbps / peak_gbps:7.1f}%" if peak_gbps else f"{'-':>8}"
            base = results.get((case.name, "torch"))
            speedup = f"{base[0] / seconds:9.2f}x" if base and backend != "torch" else f"{'':>10}"
            print(f"{case.name:<20}{backend:<9}{seconds * 1e3:9.3f}{gbps:9.1f}{pct}{speedup}  {check}")
    return results


def run_cuda(kernels, args, dtype: torch.dtype) -> None:
    card = torch.cuda.get_device_name()
    numel = args.rows * args.cols
    print(f"{card}: {args.rows}x{args.cols} {args.dtype}, peak {args.peak_gbps:.0f} GB/s (--peak-gbps)")
    cases = make_cases(kernels, args.rows, args.cols, dtype, "cuda")
    res = run_table(cases, ("torch", "triton"), numel, dtype.itemsize, cuda_timer, args.peak_gbps)

    def figures(name: str) -> tuple[float, float]:
        speedup = res[(name, "torch")][0] / res[(name, "triton")][0]
        return speedup, 100 * res[(name, "triton")][1] / args.peak_gbps

    l1_speedup, l1_pct = figures("l1_sums")
    rl_speedup, rl_pct = figures("residual_and_l1")
    print(
        f"card={card.replace(' ', '_')} l1_speedup={l1_speedup:.2f} l1_pct_peak={l1_pct:.1f} "
        f"residual_l1_speedup={rl_speedup:.2f} residual_l1_pct_peak={rl_pct:.1f}"
    )


def run_cpu(kernels, args, dtype: torch.dtype) -> None:
    print(
        "No CUDA device: the compiled Triton kernels need a GPU, so this run times only the torch "
        "reference at full size on the CPU, then both backends through triton's interpreter at a "
        "small size (interpreter timings are not performance figures)."
    )
    numel = args.rows * args.cols
    print(f"\nCPU, {args.threads} thread(s): {args.rows}x{args.cols} {args.dtype}, torch reference")
    cases = make_cases(kernels, args.rows, args.cols, dtype, "cpu")
    res = run_table(cases, ("torch",), numel, dtype.itemsize, cpu_timer(args.repeats), None)
    ratios = {"l1_sums": "skipped", "residual_and_l1": "skipped"}
    if not kernels.interpreter_enabled():
        print("\nTRITON_INTERPRET is off in this process: interpreter table skipped.")
    else:
        cols = max(1, args.interp_numel // args.rows)
        print(f"\nTriton interpreter vs torch on the CPU: {args.rows}x{cols} {args.dtype}")
        cases = make_cases(kernels, args.rows, cols, dtype, "cpu")
        interp = run_table(
            cases, ("torch", "triton"), args.rows * cols, dtype.itemsize, cpu_timer(args.interp_repeats), None
        )
        for name in ratios:
            ratios[name] = f"{interp[(name, 'triton')][0] / interp[(name, 'torch')][0]:.1f}"
    print(
        f"cpu_l1_ms={res[('l1_sums', 'torch')][0] * 1e3:.3f} "
        f"cpu_residual_l1_ms={res[('residual_and_l1', 'torch')][0] * 1e3:.3f} "
        f"interp_l1_ratio={ratios['l1_sums']} interp_residual_l1_ratio={ratios['residual_and_l1']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="tokens (default 4096)")
    parser.add_argument("--cols", type=int, default=2560, help="channels (default 2560)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--peak-gbps", type=float, default=3350.0, help="card's peak memory bandwidth")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the CPU run")
    parser.add_argument("--repeats", type=int, default=3, help="CPU repeats (minimum is kept)")
    parser.add_argument("--interp-numel", type=int, default=65536, help="elements for the interpreter run")
    parser.add_argument("--interp-repeats", type=int, default=2, help="interpreter table repeats")
    parser.add_argument("--no-interpret", action="store_true", help="CPU run: skip the interpreter table")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="64x64, 1 repeat: CI runs it so the benchmark cannot silently stop working; "
        "its numbers are not figures",
    )
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.cols, args.repeats, args.interp_numel, args.interp_repeats = 64, 64, 1, 4096, 1

    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.no_interpret:
        # Must precede the first ``import triton`` (the pack's diffusers import pulls it in).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    setup_threads(args.threads)
    load_pack()
    from hidream_pack import kernels  # type: ignore[import-not-found]

    dtype = DTYPES[args.dtype]
    if has_cuda:
        run_cuda(kernels, args, dtype)
    else:
        run_cpu(kernels, args, dtype)


if __name__ == "__main__":
    main()
