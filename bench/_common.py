"""Shared pieces of the benchmarks: the pack loader, the benchmark model, timing.

The benchmark model is "transformer-dominated": random weights, 4 double + 8 single
blocks, 4 heads x 64 (inner 256), MoE 4 experts / 2 active, 128 T5 + 128 Llama tokens
like the real model; text encoders are skipped (random embeddings), since only the
transformer's steps are being compared. CPU timings use one thread and the minimum of
repeats because these machines are noisy.
"""

from __future__ import annotations

import os
import runpy
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "hidream_pack"

BENCH_CONFIG = dict(
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=64,
    num_attention_heads=4,
    caption_channels=[64, 64],
    text_emb_dim=64,
    num_routed_experts=4,
    num_activated_experts=2,
    axes_dims_rope=(32, 16, 16),
    max_resolution=(128, 128),
    llama_layers=list(range(12)),
)
TEXT_TOKENS = 128
# ``--smoke`` runs (CI): diffusers pads a non-square latent to max_resolution's token count
# (4096 above), which alone would take a smoke run's whole time; 256 tokens fit its sizes.
SMOKE_CONFIG = dict(max_resolution=(32, 32))


def load_pack():
    """The pack by path under its fixed name, the checkout off ``sys.path`` (``pack_loader.py``)."""
    return runpy.run_path(str(ROOT / "pack_loader.py"))["load_pack"]()


def setup_threads(threads: int = 1) -> None:
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)


def bench_transformer(seed: int = 0, **overrides: object):
    """The benchmark model; ``overrides`` replace entries of ``BENCH_CONFIG`` (``SMOKE_CONFIG``)."""
    import torch
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    return HiDreamImageTransformer2DModel(**{**BENCH_CONFIG, **overrides}).eval()


def random_conditioning(seed: int = 0):
    """Random T5/Llama/pooled embeddings shaped like the pack's conditioning."""
    load_pack()
    from hidream_pack.hidream.model import tiny  # type: ignore[import-not-found]

    layers = len(BENCH_CONFIG["llama_layers"])
    return tiny.random_conditioning(seed, TEXT_TOKENS, TEXT_TOKENS, dim=64, layers=layers)


def model_handle(transformer, variant: str = "full"):
    import torch

    load_pack()
    from hidream_pack.hidream.model.handle import HiDreamModel  # type: ignore[import-not-found]

    return HiDreamModel(
        transformer=transformer, variant=variant, dtype=torch.float32, device=torch.device("cpu")
    )


def min_time(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls (noise only ever adds time)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
