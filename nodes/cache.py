"""Step-cache nodes: each takes a HIDREAM_MODEL and returns a new one carrying a cache config.

The input handle is never modified (ComfyUI may feed it to other branches); the cache
state itself is created fresh inside every sampling call.
"""

from __future__ import annotations

import json

from ..hidream import limits
from ..hidream.cache.config import (
    CacheWindow,
    DBCacheConfig,
    FirstBlockCacheConfig,
    TeaCacheConfig,
    check_combination,
)

_UNSET = -1


def _window_inputs() -> dict:
    lo, hi = limits.CACHE_MAX_CONSECUTIVE.lo, limits.CACHE_MAX_CONSECUTIVE.hi

    def opt(tooltip: str, hi_: int) -> tuple:
        return ("INT", {"default": _UNSET, "min": _UNSET, "max": hi_, "tooltip": tooltip, "advanced": True})

    return {
        "start_step": opt(
            "Runware cacheStartStep: first step that may reuse (0-based; step 0 always computes). "
            "-1 = from the start.",
            limits.STEPS.hi,
        ),
        "end_step": opt(
            "Runware cacheEndStep: steps from this one on always compute (1..steps, > start_step). "
            "-1 = to the end.",
            limits.STEPS.hi,
        ),
        "start_percent": opt(
            "Runware cacheStartStepPercentage (0..99): start_step as floor(steps * pct / 100); "
            "not together with start_step/end_step. -1 = unset.",
            limits.CACHE_START_PERCENT.hi,
        ),
        "end_percent": opt(
            "Runware cacheEndStepPercentage (1..100, > start_percent): end_step as floor(steps * pct / 100). "
            "-1 = unset.",
            limits.CACHE_END_PERCENT.hi,
        ),
        "max_consecutive": (
            "INT",
            {
                "default": limits.DEFAULT_CACHE_MAX_CONSECUTIVE,
                "min": lo,
                "max": hi,
                "tooltip": "Runware cacheMaxConsecutiveSteps: at most this many reused steps in a row (1..5); "
                "then a step computes.",
            },
        ),
    }


def _window(
    start_step: int, end_step: int, start_percent: int, end_percent: int, max_consecutive: int
) -> CacheWindow:
    def opt(v: int) -> int | None:
        return None if v == _UNSET else v

    window = CacheWindow(
        opt(start_step), opt(end_step), opt(start_percent), opt(end_percent), max_consecutive
    )
    window.validate()
    return window


def _attach(model, config):
    config.validate()
    others = tuple(c for c in model.caches if c.kind != config.kind)
    check_combination((*others, config))
    return (model.with_cache(config),)


def _threshold_input(tooltip: str, default: float = 0.25) -> tuple:
    """A 0..1 threshold widget (Runware's range and step)."""
    bounds = limits.CACHE_THRESHOLD
    return (
        "FLOAT",
        {"default": default, "min": bounds.lo, "max": bounds.hi, "step": 0.01, "tooltip": tooltip},
    )


class _CacheNode:
    CATEGORY = "HiDream"
    RETURN_TYPES = ("HIDREAM_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model with this cache attached (the input is unchanged).",)
    FUNCTION = "apply"
    EXPERIMENTAL = True

    def attach(self, model, config) -> tuple:
        """Attach ``config`` to ``model`` (the native MODEL nodes override this)."""
        return _attach(model, config)


class HiDreamI1FirstBlockCache(_CacheNode):
    NODE_ID = "HiDreamI1FirstBlockCache"
    TITLE = "HiDream-I1 First Block Cache"
    DESCRIPTION = (
        "First Block Cache (Runware fbCache): block 0 always runs; when its output barely changed since the last "
        "computed step, the other blocks are skipped and their cached residual reused. Higher threshold = more reuse."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("HIDREAM_MODEL", {"tooltip": "The model to accelerate."}),
                "threshold": _threshold_input(
                    "Runware fbCacheThreshold: reuse when block 0's relative L1 change is below this. "
                    "0 = never reuse, 1 = always; higher = faster, lower quality (Runware's text says "
                    "the opposite; this is how the algorithm is defined)."
                ),
                **_window_inputs(),
            }
        }

    def apply(self, model, threshold, start_step, end_step, start_percent, end_percent, max_consecutive):
        window = _window(start_step, end_step, start_percent, end_percent, max_consecutive)
        return self.attach(model, FirstBlockCacheConfig(threshold=threshold, window=window))


def _parse_coefficients(text: str) -> tuple[float, ...] | None:
    text = text.strip()
    if not text:
        return None
    try:
        values = json.loads(text if text.startswith("[") else f"[{text}]")
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"coefficients: {text!r} is not a comma-separated list of numbers (highest power first)"
        ) from exc
    return tuple(values)


class HiDreamI1TeaCache(_CacheNode):
    NODE_ID = "HiDreamI1TeaCache"
    TITLE = "HiDream-I1 TeaCache"
    DESCRIPTION = (
        "TeaCache (Runware teaCache): accumulates the rescaled change of the timestep embedding and skips the whole "
        "transformer while it stays below the distance. Composes with one block cache (TeaCache decides first)."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("HIDREAM_MODEL", {"tooltip": "The model to accelerate."}),
                "distance": (
                    "FLOAT",
                    {
                        "default": 0.5,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Runware teaCacheDistance: accumulated rescaled distance below which steps are "
                        "skipped. 0 = never skip; higher = faster, lower quality.",
                    },
                ),
                "coefficients": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Rescaling polynomial, highest power first, comma-separated. Empty = the "
                        "published HiDream Full/Dev/Fast polynomial of the loaded variant.",
                        "advanced": True,
                    },
                ),
                **_window_inputs(),
            }
        }

    def apply(
        self, model, distance, coefficients, start_step, end_step, start_percent, end_percent, max_consecutive
    ):
        window = _window(start_step, end_step, start_percent, end_percent, max_consecutive)
        config = TeaCacheConfig(
            distance=distance, coefficients=_parse_coefficients(coefficients), window=window
        )
        return self.attach(model, config)


class HiDreamI1DBCache(_CacheNode):
    NODE_ID = "HiDreamI1DBCache"
    TITLE = "HiDream-I1 DBCache"
    DESCRIPTION = (
        "DBCache (Runware dbCache, as in cache-dit): in each block list the first Fn blocks always run and decide; "
        "on a hit the middle blocks' cached residual is reused and the last Bn blocks run. Higher threshold = more reuse."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("HIDREAM_MODEL", {"tooltip": "The model to accelerate."}),
                "threshold": _threshold_input(
                    "Runware dbCacheThreshold: reuse when the Fn blocks' residual changed by less "
                    "than this (relative L1). 0 = never reuse, 1 = always; higher = faster, lower quality "
                    "(Runware's text says the opposite; this is how cache-dit defines it)."
                ),
                "refresh_interval": (
                    "INT",
                    {
                        "default": 5,
                        "min": 1,
                        "max": limits.CACHE_REFRESH_INTERVAL.hi,
                        "tooltip": "Runware dbCacheSkipInterval: at most this many steps are skipped between forced "
                        "refreshes (every interval+1-th step, counted from the step before the window, "
                        "computes). >= steps = never forced.",
                    },
                ),
                "front_blocks": (
                    "INT",
                    {
                        "default": 1,
                        "min": limits.DBCACHE_FRONT_BLOCKS.lo,
                        "max": limits.DBCACHE_FRONT_BLOCKS.hi,
                        "tooltip": "Fn (cache-dit Fn_compute_blocks): blocks always computed at the front of "
                        "each block list (double-stream, single-stream); their residual decides.",
                        "advanced": True,
                    },
                ),
                "back_blocks": (
                    "INT",
                    {
                        "default": 0,
                        "min": limits.DBCACHE_BACK_BLOCKS.lo,
                        "max": limits.DBCACHE_BACK_BLOCKS.hi,
                        "tooltip": "Bn (cache-dit Bn_compute_blocks): blocks always computed at the end of each "
                        "block list. Fn + Bn must leave a middle block in each list.",
                        "advanced": True,
                    },
                ),
                **_window_inputs(),
            }
        }

    def apply(
        self,
        model,
        threshold,
        refresh_interval,
        front_blocks,
        back_blocks,
        start_step,
        end_step,
        start_percent,
        end_percent,
        max_consecutive,
    ):
        window = _window(start_step, end_step, start_percent, end_percent, max_consecutive)
        config = DBCacheConfig(
            threshold=threshold,
            front_blocks=front_blocks,
            back_blocks=back_blocks,
            refresh_interval=refresh_interval,
            window=window,
        )
        return self.attach(model, config)


NODES = [HiDreamI1FirstBlockCache, HiDreamI1TeaCache, HiDreamI1DBCache]
