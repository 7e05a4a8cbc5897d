"""Host syncs per forward, static MoE vs diffusers' MoE, regional compile vs eager, in one run.

The random transformer-dominated benchmark model (``_common``: 4 double + 8 single blocks, MoE
4 experts / 2 active), 256x256, 10 steps, CFG 5 (cond and uncond as one batch of two), the
Full default scheduler, one thread, fp32, on whatever device the model is put (``--device``;
the CPU compiles with inductor's C++ backend). Three figures:

- ``host_syncs``: host syncs in one forward of our runner at 256x256, counted by
  ``hidream.forward.syncs.SyncCounter`` (diffusers' MoE in the same forward is printed beside it);
- ``moe_ratio``: wall time of our static MoE (dense gate) over diffusers' MoE, summed over
  every MoE layer of the model on the inputs it really sees in that forward (captured by
  hooks). The fixed-capacity gather layout and the FLOP ratios are printed beside it;
- ``compiled_ratio``: sampling wall time with ``compile=blocks`` over eager (both with the
  static MoE), after a warm-up call of each (which is where the compile happens; its time is
  printed), interleaved repeats, minimum of each.

Last line: ``host_syncs=<n> moe_ratio=<x> compiled_ratio=<y>``.
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
    for moe in ("dense", None):
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
    """Multiply-adds x2 of the experts' matmuls (gate and elementwise work left out)."""
    dim, hidden = layer.experts[0].w1.in_features, layer.experts[0].w1.out_features
    shared = layer.shared_experts.w1.out_features
    routed = len(layer.experts) if dense else layer.gate.top_k
    return 2 * 3 * dim * tokens * (routed * hidden + shared)


def time_moe(pairs, repeats: int, sync) -> dict[str, float]:
    import torch
    from hidream_pack.hidream.forward import moe as moe_mod

    fns = {
        "diffusers": lambda m, x: m(x),
        "dense": moe_mod.dense_forward,
        "gather": moe_mod.gather_forward,
    }
    best = dict.fromkeys(fns, float("inf"))
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            for m, x in pairs:
                fn(m, x)
        for r in range(repeats):
            for name in fns if r % 2 == 0 else reversed(list(fns)):
                sync()
                start = time.perf_counter()
                for m, x in pairs:
                    fn_out = fns[name](m, x)
                del fn_out
                sync()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def time_sampling(transformer, cond, device, repeats: int, sync) -> tuple[dict[str, float], dict[str, float]]:
    from dataclasses import replace

    import torch
    from hidream_pack.hidream.sampling.loop import SampleSettings, sample_latents
    from hidream_pack.hidream.sampling.schedulers import SchedulerSpec

    base = replace(model_handle(transformer), device=torch.device(device))
    handles = {"eager": base, "compiled": replace(base, compile="blocks")}
    settings = SampleSettings(width=SIZE, height=SIZE, steps=STEPS, cfg=CFG, seed=0)

    def run(name: str) -> tuple[float, torch.Tensor]:
        sync()
        start = time.perf_counter()
        out = sample_latents(handles[name], cond, SchedulerSpec("Default"), settings).latents
        sync()
        return time.perf_counter() - start, out

    warm, outs = {}, {}
    for name in handles:
        warm[name], outs[name] = run(name)
    diff = (outs["compiled"] - outs["eager"]).abs().max().item()
    print(f"final latents, compiled vs eager: max |diff| {diff:.3g}")
    best = dict.fromkeys(handles, float("inf"))
    for r in range(repeats):
        for name in handles if r % 2 == 0 else reversed(list(handles)):
            best[name] = min(best[name], run(name)[0])
    return best, warm


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 interleaved sampling repeats instead of 5")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
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
    moe_times = time_moe(pairs, 7 if args.quick else 11, sync)
    flops = {
        kind: sum(moe_flops(m, x.numel() // x.shape[-1], kind != "diffusers") for m, x in pairs)
        for kind in ("diffusers", "dense")
    }
    print(
        f"MoE over {len(pairs)} layers: diffusers {moe_times['diffusers'] * 1e3:.1f} ms, dense gate "
        f"{moe_times['dense'] * 1e3:.1f} ms (x{moe_times['dense'] / moe_times['diffusers']:.3f}), fixed-capacity "
        f"gather {moe_times['gather'] * 1e3:.1f} ms (x{moe_times['gather'] / moe_times['diffusers']:.3f}); "
        f"expert FLOPs dense/diffusers x{flops['dense'] / flops['diffusers']:.3f} (gather: the same as dense)"
    )
    moe_ratio = moe_times["dense"] / moe_times["diffusers"]

    best, warm = time_sampling(transformer, cond, args.device, 3 if args.quick else 5, sync)
    print(
        f"sampling {SIZE}x{SIZE}, {STEPS} steps, CFG {CFG}: eager {best['eager']:.3f} s, compiled "
        f"{best['compiled']:.3f} s (first call incl. compile: eager {warm['eager']:.1f} s, compiled "
        f"{warm['compiled']:.1f} s)"
    )
    compiled_ratio = best["compiled"] / best["eager"]
    print(f"host_syncs={ours} moe_ratio={moe_ratio:.3f} compiled_ratio={compiled_ratio:.3f}")


if __name__ == "__main__":
    main()
