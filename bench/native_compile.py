"""Item 4 of the compile issue: the sync-free MoE and regional compile on ComfyUI's native MODEL.

ComfyUI's own HiDream class at the benchmark config (``native_cache.build``: random weights,
4 double + 8 single blocks, inner 256, PyTorch SDPA attention), sampled by ComfyUI's own sampling
(``comfy.sample.sample_custom``, Euler, CFG 5, cond and uncond batched), one thread, fp32, 256x256,
10 steps, 128 + 128 text tokens: the engine figure's size (``compile.py``). Three MODELs:

- ``comfyui``: ComfyUI's own forward, untouched (its MoE indexes with boolean masks);
- ``eager``: the pack's Regional Compile (MODEL) node at ``off``: the pack's native runner with
  the sync-free grouped MoE (bit-identical to ComfyUI's here, checked);
- ``compiled``: the same node at ``blocks`` (inductor, each block class compiled once).

Host syncs are counted in one forward of each (``hidream.forward.syncs.SyncCounter``). Times are
minima over interleaved repeats after a warm-up call each (where the compile happens; printed).
Needs ComfyUI: COMFYUI_PATH, else <repo>/.comfyui/ComfyUI. Last line:

    native_host_syncs=<ours per forward> native_compiled_ratio=<compiled / ComfyUI's own sampling wall>

``--smoke``: 128x128, 1 step, 16 + 16 text tokens, 1 repeat (the compile still happens). CI runs
it so the benchmark cannot silently stop working; its numbers are not figures.
"""

from __future__ import annotations

import argparse
import sys

import native_cache as nc
from _common import load_pack, setup_threads

SIZE, STEPS, TOKENS = 256, 10, 128
SMOKE = (128, 1, 16)


def count_syncs(patcher) -> tuple[int, int, dict]:
    """(ours, ComfyUI's, ComfyUI's by op) host syncs in one batched CFG forward at SIZE."""
    import torch
    from hidream_pack.hidream.forward.syncs import SyncCounter
    from hidream_pack.hidream.native.runner import NativeRunner

    model = patcher.model.diffusion_model
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, SIZE // 8, SIZE // 8, generator=g)
    t = torch.full((2,), 700.0)
    y, context = torch.randn(2, 64, generator=g), torch.randn(2, TOKENS, 64, generator=g)
    llama = torch.randn(2, 12, TOKENS, 64, generator=g)
    with torch.no_grad():
        with SyncCounter() as ours:
            got = NativeRunner(model).forward(x, t, y, context, llama, None, {})
        with SyncCounter() as theirs:
            want = model._forward(x, t, y, context, llama, None, None, {})
    if not torch.equal(got, want):
        sys.exit("the native runner's forward is not ComfyUI's bit for bit here")
    return ours.total, theirs.total, dict(theirs.ops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 interleaved repeats instead of 5")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="128x128, 1 step, 16 text tokens, 1 repeat: CI runs it so the benchmark cannot "
        "silently stop working; its numbers are not figures",
    )
    args = parser.parse_args()
    global SIZE, STEPS, TOKENS
    if args.smoke:
        SIZE, STEPS, TOKENS = SMOKE
    setup_threads(1)
    load_pack()
    nc.SIZE, nc.TOKENS = SIZE, TOKENS
    comfy = nc.import_comfy()
    patcher = nc.build(comfy)
    ours, theirs, ops = count_syncs(patcher)
    print(
        f"host syncs per native forward at {SIZE}x{SIZE} (CFG batch 2): ours {ours}, ComfyUI's {theirs} {ops}"
    )

    from hidream_pack.nodes.native import HiDreamI1NativeCompile

    bench = nc.Bench(comfy, patcher, STEPS)
    models = {
        "comfyui": patcher,
        "eager": HiDreamI1NativeCompile().apply(patcher, "off")[0],
        "compiled": HiDreamI1NativeCompile().apply(patcher, "blocks")[0],
    }
    warm, outs = {}, {}
    for name, model in models.items():
        outs[name], warm[name] = bench.sample(model)
    eager_exact = bool((outs["eager"] == outs["comfyui"]).all())
    diff = float((outs["compiled"] - outs["comfyui"]).abs().max())
    print(
        f"final latents: eager runner == ComfyUI's: {eager_exact}; compiled vs ComfyUI's max |diff| {diff:.3g}"
    )
    best = dict.fromkeys(models, float("inf"))
    for r in range(1 if args.smoke else 3 if args.quick else 5):
        for name in models if r % 2 == 0 else reversed(list(models)):
            best[name] = min(best[name], bench.sample(models[name])[1])
    print(
        f"sampling {SIZE}x{SIZE}, {STEPS} steps, CFG {nc.CFG}: ComfyUI's {best['comfyui']:.3f} s, pack runner eager "
        f"{best['eager']:.3f} s (x{best['eager'] / best['comfyui']:.3f}), compiled {best['compiled']:.3f} s "
        f"(first calls incl. compile: {warm['comfyui']:.1f} / {warm['eager']:.1f} / {warm['compiled']:.1f} s)"
    )
    print(f"native_host_syncs={ours} native_compiled_ratio={best['compiled'] / best['comfyui']:.3f}")


if __name__ == "__main__":
    main()
