"""Our sampler vs diffusers' HiDreamImagePipeline, side by side in one process.

Same random transformer-dominated model, same embeddings, seed and scheduler (the Full
default, UniPC flow with shift 3), CFG 5, one thread, minimum of repeats. diffusers'
pipeline resizes every request to ``default_sample_size`` (set here so it produces the
exact size asked for) and pads non-square latents to 4096 tokens; ours runs the exact
token count. The last line is the figure the README quotes:

    square_ratio=<ours/diffusers at 256x256> nonsquare_ratio=<ours/diffusers at 384x256>
"""

from __future__ import annotations

import argparse
import math

from _common import bench_transformer, load_pack, min_time, model_handle, random_conditioning, setup_threads


def diffusers_pipeline(transformer, width: int, height: int):
    """A HiDreamImagePipeline holding only the transformer and the Full default scheduler."""
    from diffusers import HiDreamImagePipeline, UniPCMultistepScheduler
    from hidream_pack.hidream.sampling.schedulers import HIDREAM_FULL_SCHEDULER_CONFIG

    pipe = HiDreamImagePipeline(
        scheduler=UniPCMultistepScheduler.from_config(HIDREAM_FULL_SCHEDULER_CONFIG),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        text_encoder_4=None,
        tokenizer_4=None,
        transformer=transformer,
    )
    pipe.default_sample_size = exact_sample_size(width, height)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def exact_sample_size(width: int, height: int) -> int:
    """The pipeline rescales every request to ``(default_sample_size * 8) ** 2`` pixels and
    rounds down to multiples of 16; find a sample size that maps this request onto itself."""
    guess = round(math.sqrt(width * height) / 8)
    for size in range(max(guess - 4, 1), guess + 8):
        scale = math.sqrt((size * 8) ** 2 / (width * height))
        if (int(width * scale // 16 * 16), int(height * scale // 16 * 16)) == (width, height):
            return size
    raise SystemExit(f"no default_sample_size makes diffusers' pipeline produce {width}x{height}")


def run_diffusers(pipe, cond, width: int, height: int, steps: int, seed: int):
    import torch

    pos, neg = cond.positive, cond.negative
    return pipe(
        prompt_embeds_t5=pos.t5,
        prompt_embeds_llama3=pos.llama,
        pooled_prompt_embeds=pos.pooled,
        negative_prompt_embeds_t5=neg.t5,
        negative_prompt_embeds_llama3=neg.llama,
        negative_pooled_prompt_embeds=neg.pooled,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )[0]


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
    pipe = diffusers_pipeline(transformer, width, height)
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
    args = parser.parse_args()
    setup_threads(1)
    load_pack()
    transformer = bench_transformer()
    model = model_handle(transformer)
    cond = random_conditioning()
    repeats = 3 if args.quick else 5
    square = compare(model, transformer, cond, 256, 256, args.steps, repeats)
    # diffusers pads 384x256 to 4096 tokens (16x the work): fewer repeats keep the run short.
    nonsquare = compare(model, transformer, cond, 384, 256, args.steps, 1 if args.quick else 2)
    print(f"square_ratio={square:.3f} nonsquare_ratio={nonsquare:.3f}")


if __name__ == "__main__":
    main()
