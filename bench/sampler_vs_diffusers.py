"""Our sampler vs diffusers' HiDreamImagePipeline, side by side in one process.

Same random transformer-dominated model, same embeddings, seed and scheduler (the Full
default, UniPC flow with shift 3), CFG 5, one thread, minimum of repeats. diffusers'
pipeline resizes every request to ``default_sample_size`` (set here so it produces the
exact size asked for) and pads non-square latents to 4096 tokens; ours runs the exact
token count. The last line is the figure the README quotes:

    square_ratio=<ours/diffusers at 256x256> nonsquare_ratio=<ours/diffusers at 384x256>

``--smoke``: 128x128 and 192x128, 1 step, 1 repeat, padding to 256 tokens (``SMOKE_CONFIG``).
CI runs it so the benchmark cannot silently stop working; its numbers are not figures.
"""

from __future__ import annotations

import argparse

from _common import (
    SMOKE_CONFIG,
    bench_transformer,
    load_pack,
    min_time,
    model_handle,
    random_conditioning,
    setup_threads,
)


def diffusers_pipeline(transformer):
    """A HiDreamImagePipeline holding only the transformer and the Full default scheduler
    (``hidream.model.reference``, shared with the tests; each run sets its sample size)."""
    from diffusers import UniPCMultistepScheduler
    from hidream_pack.hidream.model.reference import diffusers_pipeline as pipeline
    from hidream_pack.hidream.sampling.schedulers import HIDREAM_FULL_SCHEDULER_CONFIG

    return pipeline(transformer, UniPCMultistepScheduler.from_config(HIDREAM_FULL_SCHEDULER_CONFIG))


def run_diffusers(pipe, cond, width: int, height: int, steps: int, seed: int):
    from hidream_pack.hidream.model.reference import diffusers_latents

    return diffusers_latents(pipe, width=width, height=height, steps=steps, cfg=5.0, seed=seed, cond=cond)


def run_ours(model, cond, width: int, height: int, steps: int, seed: int):
    from hidream_pack.hidream.sampling.loop import (
        FLUX_VAE_SCALING,
        FLUX_VAE_SHIFT,
        SampleSettings,
        sample_latents,
    )
    from hidream_pack.hidream.sampling.schedulers import SchedulerSpec

    settings = SampleSettings(width=width, height=height, steps=steps, cfg=5.0, seed=seed)
    raw = sample_latents(model, cond, SchedulerSpec("Default"), settings).latents
    return (raw - FLUX_VAE_SHIFT) * FLUX_VAE_SCALING  # back to the pipeline's scaled space


def compare(model, transformer, cond, width: int, height: int, steps: int, repeats: int) -> float:
    pipe = diffusers_pipeline(transformer)
    ours = run_ours(model, cond, width, height, steps, seed=0)
    theirs = run_diffusers(pipe, cond, width, height, steps, seed=0)
    if tuple(theirs.shape) != tuple(ours.shape):
        raise SystemExit(f"diffusers produced {tuple(theirs.shape)} for {width}x{height}; cannot compare")
    diff = (ours - theirs).abs().max().item()
    t_ours, t_theirs = float("inf"), float("inf")
    for _ in range(repeats):  # interleaved, so a burst of load on this shared machine hits both
        t_ours = min(t_ours, min_time(lambda: run_ours(model, cond, width, height, steps, 0), 1))
        t_theirs = min(t_theirs, min_time(lambda: run_diffusers(pipe, cond, width, height, steps, 0), 1))
    print(
        f"{width}x{height}: ours {t_ours:.3f} s, diffusers {t_theirs:.3f} s, "
        f"ratio {t_ours / t_theirs:.3f}, max |latent diff| {diff:.2e}"
    )
    return t_ours / t_theirs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats (1 for the padded size) instead of 5")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="128x128 and 192x128, 1 step, 1 repeat: CI runs it so the benchmark cannot silently "
        "stop working; its numbers are not figures",
    )
    args = parser.parse_args()
    square_size, nonsquare_size = ((128, 128), (192, 128)) if args.smoke else ((256, 256), (384, 256))
    if args.smoke:
        args.steps = 1
    setup_threads(1)
    load_pack()
    transformer = bench_transformer(**(SMOKE_CONFIG if args.smoke else {}))
    model = model_handle(transformer)
    cond = random_conditioning()
    repeats = 1 if args.smoke else 3 if args.quick else 5
    square = compare(model, transformer, cond, *square_size, args.steps, repeats)
    # diffusers pads 384x256 to 4096 tokens (16x the work): fewer repeats keep the run short.
    nonsquare = compare(
        model, transformer, cond, *nonsquare_size, args.steps, 1 if args.quick or args.smoke else 2
    )
    print(f"square_ratio={square:.3f} nonsquare_ratio={nonsquare:.3f}")


if __name__ == "__main__":
    main()
