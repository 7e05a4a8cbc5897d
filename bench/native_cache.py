"""Our caches on ComfyUI's native HiDream MODEL vs no cache and vs core EasyCache, in one run.

ComfyUI's own HiDream model class (``comfy.model_base.HiDream``) is built in this process at
the benchmark config of ``_common`` (random weights, 4 double + 8 single blocks, inner 256,
128 + 128 text tokens: a small config, since ComfyUI's loader only builds the full size), and
sampled by ComfyUI's own sampling (``comfy.sample.sample_custom``, Euler over the pack's
FlowMatchEuler sigmas, CFG 5, cond and uncond batched, PyTorch SDPA attention), one thread:
``--quick`` 8 steps at 128x128 with 64 + 64 text tokens, else 30 steps at 256x256 with 128 + 128.

For FB / DB / Tea the thresholds are read off the model by ``calibrate`` so that about half
the model calls reuse; TeaCache rescales with the coefficients ``0.5, 0`` (the published
polynomials are fitted to the trained model's embeddings, not to random weights). efficiency = measured speedup / ideal
speedup, the ideal being 1 / (fraction of block calls run); native_efficiency is over our
three caches together (sum of ideal times / sum of measured times). Core EasyCache (start 0,
end 1, its threshold bisected until it skips as many steps as our TeaCache) skips the whole
model on a hit, as TeaCache does, so vs_easycache = our TeaCache wall / EasyCache wall
compares the two attachments' overheads. Times are minima over interleaved repeats (5 with
--quick, 3 without; order rotated per repeat); CPU-time figures are printed too, since wall time on a shared machine is noisy.
The two runs differ by about a millisecond a skipped call against ~0.5 s a computed one, far
below that noise, so TeaCache and EasyCache then run PAIR_REPEATS more times each, alternating
(ABBA), and vs_easycache is the ratio of their minima over all their runs; those extra runs
also time every model call (CPU time, outermost DIFFUSION_MODEL wrapper) and print the cost of
a skipped and of a computed call for each.
Needs ComfyUI: COMFYUI_PATH, else <repo>/.comfyui/ComfyUI. Last line:

    native_efficiency=<x> vs_easycache=<y>

``--smoke``: 3 steps at 128x128, 16 + 16 text tokens, 1 repeat, 1 pair run, 1 EasyCache probe.
CI runs it so the benchmark cannot silently stop working; its numbers are not figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import time
from pathlib import Path

from _common import BENCH_CONFIG, ROOT, TEXT_TOKENS, load_pack, setup_threads

# Random weights do not converge like a trained model, so the thresholds are read off this model
# (``calibrate``): the block caches' at the 60th percentile of the block-0 residual distances of
# an uncached run; TeaCache's at 1.5 x the median rescaled change of its input (the timestep
# embedding), so about every other step is a hit.
TEA_COEFFICIENTS = (0.5, 0.0)
QUICK = (8, 128, 64)  # steps, size, text tokens per stream
FULL = (30, 256, TEXT_TOKENS)
SMOKE = (3, 128, 16)  # 3 steps: the calibration needs a step with a distance after the first
PAIR_REPEATS = 10  # extra alternating TeaCache / EasyCache runs each, for vs_easycache
SIZE = 256
TOKENS = TEXT_TOKENS
CFG = 5.0


def import_comfy():
    root = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".comfyui" / "ComfyUI")
    if not (root / "comfy" / "model_base.py").is_file():
        sys.exit(
            f"ComfyUI not found at {root}: set COMFYUI_PATH (bash ../shared/comfyui/install.sh PYTHON .comfyui)"
        )
    sys.path.insert(0, str(root))
    import comfy.cli_args
    import torch

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True  # SDPA (ComfyUI's CPU default is sub-quadratic)
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models

    return comfy


def build(comfy):
    import torch
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    weights = HiDreamImageTransformer2DModel(**BENCH_CONFIG).eval().state_dict()
    model_config = comfy.supported_models.HiDream({"image_model": "hidream", **BENCH_CONFIG})
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, device="cpu")
    base.diffusion_model.load_state_dict(weights)
    base.diffusion_model.eval()
    dev = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=dev, offload_device=dev)


def conds():
    import torch

    g = torch.Generator().manual_seed(1)
    layers = len(BENCH_CONFIG["llama_layers"])

    def one():
        return [
            [
                torch.randn(1, TOKENS, 64, generator=g),
                {
                    "pooled_output": torch.randn(1, 64, generator=g),
                    "conditioning_llama3": torch.randn(1, layers, TOKENS, 64, generator=g),
                },
            ]
        ]

    return one(), one()


class Bench:
    def __init__(self, comfy, patcher, steps: int) -> None:
        import torch
        from hidream_pack.hidream.sampling.schedulers import SchedulerSpec, make_sampler

        self.comfy, self.patcher = comfy, patcher
        self.sigmas = make_sampler(SchedulerSpec("FlowMatchEulerDiscreteScheduler"), "full", steps).sigmas
        self.pos, self.neg = conds()
        self.latent = torch.zeros(1, 16, SIZE // 8, SIZE // 8)
        self.noise = comfy.sample.prepare_noise(self.latent, 0)

    def sample(self, model):
        import torch

        with torch.no_grad():
            start, cpu = time.perf_counter(), time.process_time()
            out = self.comfy.sample.sample_custom(
                model,
                self.noise,
                CFG,
                self.comfy.samplers.ksampler("euler"),
                self.sigmas,
                self.pos,
                self.neg,
                self.latent,
                disable_pbar=True,
                seed=0,
            )
            self.cpu = time.process_time() - cpu
            return out, time.perf_counter() - start


def our_model(patcher, method: str, threshold: float):
    from hidream_pack.hidream.cache.config import DBCacheConfig, FirstBlockCacheConfig, TeaCacheConfig
    from hidream_pack.hidream.native.cache import attach_cache

    never = 1000  # no forced refresh (the other methods have none)
    config = {
        "FB": lambda: FirstBlockCacheConfig(threshold=threshold),
        "DB": lambda: DBCacheConfig(threshold=threshold, refresh_interval=never),
        "Tea": lambda: TeaCacheConfig(distance=threshold, coefficients=TEA_COEFFICIENTS),
    }[method]()
    # TeaCache skips the whole model on a hit here, as EasyCache does (the pair compares overheads)
    return attach_cache(patcher, config, f"bench {method}", reuse_output=method == "Tea")


def calibrate(bench) -> dict[str, float]:
    """Thresholds that reuse about half the model calls on this model (the comment above TEA_COEFFICIENTS)."""
    import torch

    probe = our_model(bench.patcher, "FB", 0.0)
    bench.sample(probe)
    dists = [r.distance("remaining") for r in session_of(probe).records if r.distances]
    block = float(torch.tensor(dists).quantile(0.6))
    embed = bench.patcher.model.diffusion_model.t_embedder
    embs = [embed(torch.tensor([float(s) * 1000]), torch.float32) for s in bench.sigmas[:-1]]
    changes = [float((b - a).abs().sum() / a.abs().sum()) for a, b in zip(embs, embs[1:], strict=False)]
    rescaled = TEA_COEFFICIENTS[0] * float(torch.tensor(changes).median())
    return {"FB": round(block, 4), "DB": round(block, 4), "Tea": round(min(1.5 * rescaled, 1.0), 4)}


def session_of(model):
    from hidream_pack.hidream.native.cache import KEY

    return model.model_options["transformer_options"][KEY].last_session


def reused_fraction(model) -> float:
    recs = session_of(model).records
    return sum(1 for r in recs if r.reused) / len(recs)


class _SkipLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.skipped: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"EasyCache - skipped (\d+)/", record.getMessage())
        if m:
            self.skipped = int(m.group(1))


def easycache_model(patcher, threshold: float):
    import comfy.patcher_extension as pe
    from comfy_extras import nodes_easycache as ec

    model = patcher.clone()
    model.model_options["transformer_options"]["easycache"] = ec.EasyCacheHolder(
        threshold, 0.0, 1.0, subsample_factor=8, offload_cache_diff=False, verbose=False
    )
    model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "easycache", ec.easycache_sample_wrapper)
    model.add_wrapper_with_key(
        pe.WrappersMP.CALC_COND_BATCH, "easycache", ec.easycache_calc_cond_batch_wrapper
    )
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "easycache", ec.easycache_forward_wrapper)
    return model


def bisect(probe, lo: float, hi: float, target, iters: int):
    """The threshold in [lo, hi] whose probe value is closest to ``target`` (probe increasing)."""
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        value = probe(mid)
        if best is None or abs(value - target) < abs(best[1] - target):
            best = (mid, value)
        if value == target:
            break
        lo, hi = (mid, hi) if value < target else (lo, mid)
    return best


class CallTimer:
    """CPU time of every model call, as the outermost DIFFUSION_MODEL wrapper sees it (so it
    includes each cache's own wrapper work)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, executor, *args, **kwargs):
        start = time.thread_time()
        try:
            return executor(*args, **kwargs)
        finally:
            self.calls.append(time.thread_time() - start)

    def timed(self, patcher):
        """A clone of ``patcher`` whose model calls this timer records (add caches on top)."""
        import comfy.patcher_extension as pe

        model = patcher.clone()
        model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "bench_timer", self)
        return model


def split_calls(calls: list[float], skipped: int) -> tuple[float, float]:
    """(median skipped-call, median computed-call) seconds: the ``skipped`` shortest calls are the
    skips (each cache's own count), a skip being hundreds of times cheaper than a computed call."""
    ordered = sorted(calls)
    skips, computed = ordered[:skipped], ordered[skipped:]
    return statistics.median(skips) if skips else 0.0, statistics.median(computed) if computed else 0.0


def pair_runs(bench, thresholds: tuple[float, float], ec_log: _SkipLog, best: dict, best_cpu: dict) -> None:
    """PAIR_REPEATS more TeaCache and EasyCache runs each (ABBA order), folded into their minima;
    prints the per-call costs (CPU ms: skipped call, computed call) and time outside the model."""
    timer = CallTimer()
    base = timer.timed(bench.patcher)
    models = {"Tea": our_model(base, "Tea", thresholds[0]), "EasyCache": easycache_model(base, thresholds[1])}
    costs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in models}
    for r in range(PAIR_REPEATS):
        for name in ("Tea", "EasyCache") if r % 2 == 0 else ("EasyCache", "Tea"):
            timer.calls.clear()
            _, wall = bench.sample(models[name])
            best[name], best_cpu[name] = min(best[name], wall), min(best_cpu[name], bench.cpu)
            skipped = skipped_calls(models[name], name, ec_log)
            costs[name].append((*split_calls(timer.calls, skipped), bench.cpu - sum(timer.calls)))
            print(f"  {name} (pair): {wall:.2f} s wall, {bench.cpu:.2f} s CPU", file=sys.stderr, flush=True)
    estimate = {}
    for name, rows in costs.items():
        skip, comp, outside = (min(col) * 1000 for col in zip(*rows, strict=True))
        skipped = skipped_calls(models[name], name, ec_log)
        estimate[name] = skip * skipped + comp * (len(timer.calls) - skipped) + outside
        print(
            f"{name} per call (CPU ms, min over {PAIR_REPEATS} runs of the median): skipped {skip:.2f}, "
            f"computed {comp:.1f}; outside the model {outside:.1f} a run; a run from these {estimate[name]:.0f}"
        )
    print(
        f"per-call estimate (not the target figure): vs_easycache={estimate['Tea'] / estimate['EasyCache']:.3f}"
    )


def skipped_calls(model, name: str, ec_log: _SkipLog) -> int:
    """Model calls skipped whole in the last run: ours are the steps on which every cond's record
    says ``tea``; EasyCache's come from its log (one batched call a step, as the bench's conds are)."""
    if name != "Tea":
        return ec_log.skipped or 0
    steps: dict[int, bool] = {}
    for rec in session_of(model).records:  # one record per cond; a batched call holds both
        steps[rec.step] = steps.get(rec.step, True) and rec.reused == ("tea",)
    return sum(steps.values())


def forward_ab(bench, repeats: int) -> None:
    """One CFG forward alone, ComfyUI's against the pack's runner (what a computed call of
    ours runs), interleaved ``repeats`` times: the outputs must be equal; prints the ratios of
    their minima and medians (thread CPU time)."""
    import torch
    from hidream_pack.hidream.native.runner import NativeRunner

    model = bench.patcher.model.diffusion_model
    runner = NativeRunner(model)
    x = torch.randn(2, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(2))
    t = torch.full((2,), 500.0)
    pos, neg = (c[0] for c in (bench.pos, bench.neg))
    y, context, llama = (
        torch.cat([pos[1]["pooled_output"], neg[1]["pooled_output"]]),
        torch.cat([pos[0], neg[0]]),
        torch.cat([pos[1]["conditioning_llama3"], neg[1]["conditioning_llama3"]]),
    )
    calls = {
        "ComfyUI": lambda: model(x, t, y=y, context=context, encoder_hidden_states_llama3=llama),
        "ours": lambda: runner.forward(x, t, y, context, llama),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        if not torch.equal(calls["ComfyUI"](), calls["ours"]()):
            sys.exit("the runner's forward differs from ComfyUI's")
        for r in range(repeats):
            for name in calls if r % 2 == 0 else reversed(list(calls)):
                start = time.thread_time()
                calls[name]()
                times[name].append(time.thread_time() - start)
    lo, mid = (f(times["ours"]) / f(times["ComfyUI"]) for f in (min, statistics.median))
    print(
        f"one forward, {repeats} interleaved repeats, outputs equal: ours {min(times['ours']) * 1e3:.1f} ms, "
        f"ComfyUI's {min(times['ComfyUI']) * 1e3:.1f} ms (minima); forward_ratio={lo:.3f} (minima), {mid:.3f} (medians)"
    )


def rel_l1(a, b) -> float:
    return float((a - b).abs().sum() / b.abs().sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK[0]} steps at {QUICK[1]}px, {QUICK[2]} text tokens",
    )
    parser.add_argument(
        "--forward",
        type=int,
        metavar="N",
        help="only time one forward, ComfyUI's against the pack's runner, N interleaved repeats",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE[0]} steps at {SMOKE[1]}px, {SMOKE[2]} text tokens, 1 repeat: CI runs it so the "
        "benchmark cannot silently stop working; its numbers are not figures",
    )
    args = parser.parse_args()
    global SIZE, TOKENS, PAIR_REPEATS
    steps, SIZE, TOKENS, repeats = (*QUICK, 5) if args.quick else (*FULL, 3)
    if args.smoke:
        (steps, SIZE, TOKENS), repeats, PAIR_REPEATS = SMOKE, 1, 1
    setup_threads(1)
    load_pack()
    comfy = import_comfy()
    bench = Bench(comfy, build(comfy), steps)
    if args.forward:
        forward_ab(bench, args.forward)
        return
    print(
        f"native HiDream (ComfyUI's model class, bench config), {SIZE}x{SIZE}, {TOKENS}+{TOKENS} text tokens, "
        f"{steps} steps, CFG {CFG}, euler"
    )

    import torch

    with torch.no_grad():
        thresholds = calibrate(bench)
    tea_model = our_model(bench.patcher, "Tea", thresholds["Tea"])
    bench.sample(tea_model)
    tea_skipped = len({r.step for r in session_of(tea_model).records if "tea" in r.reused})
    handler = _SkipLog()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)

    def ec_probe(t):
        bench.sample(easycache_model(bench.patcher, t))
        print(f"  EasyCache probe threshold {t:.4f}: skipped {handler.skipped}", file=sys.stderr, flush=True)
        return handler.skipped

    ec_threshold, ec_skipped = bisect(ec_probe, 0.0, 1.0, tea_skipped, 1 if args.smoke else 4)

    models = {"none": bench.patcher, "EasyCache": easycache_model(bench.patcher, ec_threshold)}
    models.update({m: our_model(bench.patcher, m, thresholds[m]) for m in ("FB", "DB", "Tea")})
    best = {name: float("inf") for name in models}
    best_cpu = dict(best)
    outs = {}
    names = list(models)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no fixed first place
            outs[name], wall = bench.sample(models[name])
            best[name], best_cpu[name] = min(best[name], wall), min(best_cpu[name], bench.cpu)
            print(f"  {name}: {wall:.2f} s wall, {bench.cpu:.2f} s CPU", file=sys.stderr, flush=True)
    pair, pair_cpu = ({k: d[k] for k in ("Tea", "EasyCache")} for d in (best, best_cpu))
    pair_runs(bench, (thresholds["Tea"], ec_threshold), handler, pair, pair_cpu)
    t0 = best["none"]
    head = ("method", "threshold", "reused", "blocks", "wall s", "speedup", "ideal", "eff", "relL1")
    print("{:10} {:>9} {:>7} {:>7} {:>7} {:>8} {:>6} {:>5} {:>6}".format(*head))
    print(f"{'none':10} {'-':>9} {'0':>7} {'1.000':>7} {t0:7.2f} {1.0:8.2f} {1.0:6.2f} {1.0:5.2f} {0.0:6.3f}")
    ideal_sum = wall_sum = 0.0
    nb = len(BENCH_CONFIG["llama_layers"])
    for m in ("FB", "DB", "Tea"):
        session = session_of(models[m])
        frac = session.block_fraction(nb)
        speed, ideal = t0 / best[m], 1 / frac
        ideal_sum, wall_sum = ideal_sum + t0 * frac, wall_sum + best[m]
        reused = f"{sum(1 for r in session.records if r.reused)}/{len(session.records)}"
        print(
            f"{m:10} {thresholds[m]:9.4f} {reused:>7} {frac:7.3f} {best[m]:7.2f} {speed:8.2f} {ideal:6.2f} "
            f"{speed / ideal:5.2f} {rel_l1(outs[m], outs['none']):6.3f}"
        )
    print(
        f"{'EasyCache':10} {ec_threshold:9.4f} {f'{ec_skipped}/{steps}':>7} {'-':>7} {best['EasyCache']:7.2f} "
        f"{t0 / best['EasyCache']:8.2f} {'-':>6} {'-':>5} {rel_l1(outs['EasyCache'], outs['none']):6.3f}"
    )
    print(
        f"TeaCache skipped {tea_skipped}/{steps} steps, EasyCache {ec_skipped}/{steps} (reused: model calls, 2 a step)"
    )
    cpu_ideal = sum(best_cpu["none"] * session_of(models[m]).block_fraction(nb) for m in ("FB", "DB", "Tea"))
    cpu_sum = sum(best_cpu[m] for m in ("FB", "DB", "Tea"))
    print(
        f"CPU-time figures (less sensitive to a shared machine): native_efficiency={cpu_ideal / cpu_sum:.3f} "
        f"vs_easycache={pair_cpu['Tea'] / pair_cpu['EasyCache']:.3f}"
    )
    runs = repeats + PAIR_REPEATS
    print(
        f"vs_easycache over {runs} runs each: TeaCache {pair['Tea']:.3f} s wall / {pair_cpu['Tea']:.3f} s CPU, "
        f"EasyCache {pair['EasyCache']:.3f} s wall / {pair_cpu['EasyCache']:.3f} s CPU"
    )
    print(f"native_efficiency={ideal_sum / wall_sum:.3f} vs_easycache={pair['Tea'] / pair['EasyCache']:.3f}")


if __name__ == "__main__":
    main()
