"""Host syncs per forward, static MoE vs diffusers' MoE, regional compile vs eager, in one run.

The random transformer-dominated benchmark model (``_common``: 4 double + 8 single blocks, MoE
4 experts / 2 active), 256x256, 10 steps, CFG 5 (cond and uncond as one batch of two), the
Full default scheduler, one thread, fp32, on whatever device the model is put (``--device``;
the CPU compiles with inductor's C++ backend). Three figures:

- ``host_syncs``: host syncs in one forward of our runner at 256x256, counted by
  ``hidream.forward.syncs.SyncCounter`` (diffusers' MoE in the same forward is printed beside it);
- ``moe_ratio``: wall time of the MoE layout the engine uses (``grouped``: grouped GEMMs over
  the routed tokens, ``hidream.forward.moe``) over diffusers' MoE, summed over every MoE layer of the
  model on the inputs it really sees in that forward (captured by hooks), interleaved
  repeats, minimum of each. The dense-gate and fixed-capacity gather layouts and the FLOP
  ratios are printed beside it;
- ``compiled_ratio``: sampling wall time with ``compile=blocks`` over eager (both with the
  engine's default MoE: ``grouped``), after a warm-up call of each (which is where the
  compile happens; its time is printed), interleaved repeats, minimum of each. Eager sampling
  with diffusers' MoE is timed beside them (what ``moe="auto"`` replaced in eager runs).

Last line: ``host_syncs=<n> moe_ratio=<x> compiled_ratio=<y>``.

``--smoke``: 128x128, 1 step, 1 repeat (the compile still happens). CI runs it so the
benchmark cannot silently stop working; its numbers are not figures.
"""

from __future__ import annotations

import argparse
import time

from _common import (
    BENCH_CONFIG,
    bench_transformer,
    load_pack,
    model_handle,
    random_conditioning,
    setup_threads,
)

SIZE = 256
STEPS = 10
CFG = 5.0


def _forward_inputs(transformer, cond, device):
    import torch

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, BENCH_CONFIG["in_channels"], SIZE // 8, SIZE // 8, generator=g).to(device)
    t = torch.full((2,), 700.0, device=device)
    neg, pos = cond.negative, cond.positive
    t5 = torch.cat([neg.t5, pos.t5]).to(device)
    llama = torch.cat([neg.llama, pos.llama], dim=1).to(device)
    pooled = torch.cat([neg.pooled, pos.pooled]).to(device)
    return x, t, t5, llama, pooled


def count_syncs(transformer, cond, device) -> tuple[int, int, dict]:
    """(ours, diffusers' MoE, ours by op) host syncs in one CFG forward at SIZE."""
    import torch
    from hidream_pack.hidream.forward.runner import TransformerRunner
    from hidream_pack.hidream.forward.syncs import SyncCounter

    inputs = _forward_inputs(transformer, cond, device)
    counts = []
    for moe in ("grouped", None):
        runner = TransformerRunner(transformer, moe=moe)
        with torch.no_grad(), SyncCounter() as c:
            runner.forward(*inputs)
        counts.append(c)
    return counts[0].total, counts[1].total, dict(counts[0].ops)


def moe_inputs(transformer, cond, device) -> list[tuple[object, object]]:
    """(MoE layer, the input it gets) for every MoE layer, from one forward of our runner."""
    import torch
    from hidream_pack.hidream.forward.moe import is_moe
    from hidream_pack.hidream.forward.runner import TransformerRunner

    seen, hooks = [], []
    for module in transformer.modules():
        if is_moe(module):
            hooks.append(module.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].clone()))))
    try:
        with torch.no_grad():
            TransformerRunner(transformer, moe=None).forward(*_forward_inputs(transformer, cond, device))
    finally:
        for h in hooks:
            h.remove()
    return seen


def moe_flops(layer, tokens: int, dense: bool) -> int:
    """Multiply-adds x2 of the experts' matmuls (gate and elementwise work left out).

    ``dense``: every expert on every token; else the top-k experts only (diffusers, grouped).
    """
    dim, hidden = layer.experts[0].w1.in_features, layer.experts[0].w1.out_features
    shared = layer.shared_experts.w1.out_features
    routed = len(layer.experts) if dense else layer.gate.top_k
    return 2 * 3 * dim * tokens * (routed * hidden + shared)


def time_moe(pairs, repeats: int, sync) -> dict[str, float]:
    """Seconds per layout for all MoE layers: per layer, the layouts take turns (order flipped
    every repeat) and the minimum over repeats is kept; the per-layer minima are summed. Minima
    per layer, not per whole pass, so a burst of load from other work on a shared machine
    spoils one layer's sample, not a whole pass."""
    import torch
    from hidream_pack.hidream.forward import moe as moe_mod

    swaps = {id(m): moe_mod.StaticMoE([m], "grouped") for m, _ in pairs}

    def grouped(m, x):  # as the engine runs it: experts packed once, no copy per call
        with swaps[id(m)].active(0):
            return m(x)

    fns = {
        "diffusers": lambda m, x: m(x),
        "grouped": grouped,
        "grouped_copying": moe_mod.grouped_forward,  # the experts stacked on every call
        "dense": moe_mod.dense_forward,
        "gather": moe_mod.gather_forward,
    }
    best = {name: [float("inf")] * len(pairs) for name in fns}
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            for m, x in pairs:
                fn(m, x)
        for r in range(repeats):
            for i, (m, x) in enumerate(pairs):
                for name in fns if (r + i) % 2 == 0 else reversed(list(fns)):
                    sync()
                    start = time.perf_counter()
                    fns[name](m, x)
                    sync()
                    best[name][i] = min(best[name][i], time.perf_counter() - start)
    return {name: sum(times) for name, times in best.items()}


def _runner_class(moe_override: bool):
    """The sampler's runner class: the engine's own, or one pinned to diffusers' MoE."""
    from functools import partial

    from hidream_pack.hidream.forward.runner import TransformerRunner

    return partial(TransformerRunner, moe=None) if moe_override else TransformerRunner


def time_sampling(transformer, cond, device, repeats: int, sync) -> tuple[dict[str, float], dict[str, float]]:
    """Eager (default MoE), compiled, and eager with diffusers' MoE; interleaved, minima."""
    from dataclasses import replace
    from unittest import mock

    import torch
    from hidream_pack.hidream.sampling import loop as sampling
    from hidream_pack.hidream.sampling.loop import SampleSettings, sample_latents
    from hidream_pack.hidream.sampling.schedulers import SchedulerSpec

    base = replace(model_handle(transformer), device=torch.device(device))
    handles = {"eager": base, "compiled": replace(base, compile="blocks"), "eager_diffusers_moe": base}
    settings = SampleSettings(width=SIZE, height=SIZE, steps=STEPS, cfg=CFG, seed=0)

    def run(name: str) -> tuple[float, torch.Tensor]:
        runner = _runner_class(name == "eager_diffusers_moe")
        with mock.patch.object(sampling, "TransformerRunner", runner):
            sync()
            start = time.perf_counter()
            out = sample_latents(handles[name], cond, SchedulerSpec("Default"), settings).latents
            sync()
        return time.perf_counter() - start, out

    warm, outs = {}, {}
    for name in handles:
        warm[name], outs[name] = run(name)
    diff = (outs["compiled"] - outs["eager"]).abs().max().item()
    theirs = (outs["eager_diffusers_moe"] - outs["eager"]).abs().max().item()
    print(f"final latents, compiled vs eager: max |diff| {diff:.3g}; eager vs diffusers' MoE {theirs:.3g}")
    best = dict.fromkeys(handles, float("inf"))
    for r in range(repeats):
        for name in handles if r % 2 == 0 else reversed(list(handles)):
            best[name] = min(best[name], run(name)[0])
    return best, warm


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 interleaved sampling repeats instead of 5 (7 MoE repeats instead of 11)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="128x128, 1 step, 1 repeat: CI runs it so the benchmark cannot silently stop working; "
        "its numbers are not figures",
    )
    args = parser.parse_args()
    global SIZE, STEPS
    if args.smoke:
        SIZE, STEPS = 128, 1
    setup_threads(1)
    load_pack()
    import torch

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    transformer = bench_transformer().to(args.device)
    cond = random_conditioning()

    ours, theirs, ops = count_syncs(transformer, cond, args.device)
    print(
        f"host syncs per forward at {SIZE}x{SIZE} (CFG batch 2): ours {ours}{' ' + str(ops) if ops else ''}, diffusers' MoE {theirs}"
    )

    pairs = moe_inputs(transformer, cond, args.device)
    moe_times = time_moe(pairs, 1 if args.smoke else 7 if args.quick else 11, sync)
    flops = {
        kind: sum(moe_flops(m, x.numel() // x.shape[-1], kind != "diffusers") for m, x in pairs)
        for kind in ("diffusers", "dense")
    }
    base = moe_times["diffusers"]
    others = ", ".join(
        f"{name} {moe_times[name] * 1e3:.1f} ms (x{moe_times[name] / base:.3f})"
        for name in ("grouped_copying", "dense", "gather")
    )
    print(
        f"MoE over {len(pairs)} layers: diffusers {base * 1e3:.1f} ms, grouped (the engine's) "
        f"{moe_times['grouped'] * 1e3:.1f} ms (x{moe_times['grouped'] / base:.3f}); {others}; expert FLOPs "
        f"grouped/diffusers x1.000, dense/diffusers x{flops['dense'] / flops['diffusers']:.3f} (gather: as dense)"
    )
    moe_ratio = moe_times["grouped"] / base

    repeats = 1 if args.smoke else 3 if args.quick else 5
    best, warm = time_sampling(transformer, cond, args.device, repeats, sync)
    print(
        f"sampling {SIZE}x{SIZE}, {STEPS} steps, CFG {CFG}: eager {best['eager']:.3f} s, compiled "
        f"{best['compiled']:.3f} s, eager with diffusers' MoE {best['eager_diffusers_moe']:.3f} s "
        f"(x{best['eager'] / best['eager_diffusers_moe']:.3f}) (first call incl. compile: eager "
        f"{warm['eager']:.1f} s, compiled {warm['compiled']:.1f} s)"
    )
    compiled_ratio = best["compiled"] / best["eager"]
    print(f"host_syncs={ours} moe_ratio={moe_ratio:.3f} compiled_ratio={compiled_ratio:.3f}")


if __name__ == "__main__":
    main()
