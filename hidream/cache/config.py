"""Step-cache options: First Block Cache, TeaCache, DBCache, and their shared window.

All three skip work on steps whose input barely changed since the last computed step,
measured by the relative L1 distance ``sum|cur - prev| / sum|prev|``, and reuse a cached
residual instead. Threshold meaning (one meaning for all three, on purpose): a step is
*reused* when its distance is *below* the threshold, so a HIGHER threshold reuses MORE.
That is how First Block Cache, TeaCache and cache-dit define it. Runware's text says the
opposite for ``fbCacheThreshold``/``dbCacheThreshold`` ("lower values reuse more
aggressively"); we keep the algorithms' meaning and the API's defaults (fb 0.25, tea 0.5,
db 0.25, refresh interval 5, max consecutive 3), and the README says so.

The ends of the range are exact: 0 never reuses (output bit-identical to no cache), and for
the block caches 1.0 reuses whenever the window rules allow, whatever the distance (as in
cache-dit, where a threshold >= 1 means "always similar").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import limits
from ..limits import check_int, check_number

# Published HiDream TeaCache polynomials (highest power first), from ComfyUI-TeaCache.
TEACACHE_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "full": (-3.13605009e04, -7.12425503e02, 4.91363285e01, 8.26515490e00, 1.08053901e-01),
    "dev": (1.39997273, -4.30130469, 5.01534416, -2.20504164, 0.93942874),
    "fast": (2.26509623, -6.88864563, 7.61123826, -3.10849353, 0.99927602),
}


@dataclass(frozen=True)
class CacheWindow:
    """Which steps may reuse a cache (Runware ``acceleratorOptions`` window fields).

    Args:
        start_step / end_step: absolute step indices; caching is allowed on steps
            ``start <= i < end``. ``None`` = from the first / to the last step.
        start_percent / end_percent: the same as percentages of the step count
            (``floor(steps * pct / 100)``); not together with the absolute fields.
        max_consecutive: at most this many reused steps in a row (1..5, default 3).
    Step 0 always computes, whatever the window says: there is nothing to reuse yet.
    """

    start_step: int | None = None
    end_step: int | None = None
    start_percent: int | None = None
    end_percent: int | None = None
    max_consecutive: int = 3

    def validate(self) -> None:
        """Checks that do not need the step count (done when the node runs)."""
        if self.start_step is not None:
            check_int("cacheStartStep", self.start_step, limits.CACHE_START_STEP)
        if self.end_step is not None:
            check_int("cacheEndStep", self.end_step, limits.CACHE_END_STEP)
        if self.start_percent is not None:
            check_int("cacheStartStepPercentage", self.start_percent, limits.CACHE_START_PERCENT)
        if self.end_percent is not None:
            check_int("cacheEndStepPercentage", self.end_percent, limits.CACHE_END_PERCENT)
        check_int("cacheMaxConsecutiveSteps", self.max_consecutive, limits.CACHE_MAX_CONSECUTIVE)
        absolute = self.start_step is not None or self.end_step is not None
        percent = self.start_percent is not None or self.end_percent is not None
        if absolute and percent:
            raise ValueError(
                "cacheStartStep/cacheEndStep and cacheStartStepPercentage/cacheEndStepPercentage: "
                "give absolute steps or percentages, not both"
            )
        if self.start_step is not None and self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(
                f"cacheEndStep: {self.end_step} must be greater than cacheStartStep ({self.start_step})"
            )
        if (
            self.start_percent is not None
            and self.end_percent is not None
            and self.end_percent <= self.start_percent
        ):
            raise ValueError(
                f"cacheEndStepPercentage: {self.end_percent} must be greater than "
                f"cacheStartStepPercentage ({self.start_percent})"
            )

    def resolve(self, steps: int) -> tuple[int, int]:
        """The ``[start, end)`` step range for a run of ``steps`` steps."""
        self.validate()
        if self.end_step is not None and self.end_step > steps:
            raise ValueError(f"cacheEndStep: {self.end_step} must be <= steps ({steps})")
        if self.start_step is not None and self.start_step >= steps:
            raise ValueError(f"cacheStartStep: {self.start_step} must be < steps ({steps})")
        if self.start_percent is not None or self.end_percent is not None:
            start = steps * (self.start_percent or 0) // 100
            end = steps * (self.end_percent if self.end_percent is not None else 100) // 100
            return start, end
        start = self.start_step if self.start_step is not None else 0
        end = self.end_step if self.end_step is not None else steps
        return start, end

    def tag(self) -> str:
        if self.start_percent is not None or self.end_percent is not None:
            span = f"{self.start_percent or 0}%-{self.end_percent or 100}%"
        else:
            span = f"{self.start_step or 0}-{self.end_step if self.end_step is not None else 'end'}"
        return f"W{span}_M{self.max_consecutive}"


@dataclass(frozen=True)
class FirstBlockCacheConfig:
    """First Block Cache: block 0 always runs; if its image-token residual changed by less
    than ``threshold`` (relative L1) since the last computed step, the cached residual of
    all remaining blocks is added instead of running them. Default 0.25 (Runware's).
    0 = never reuse, 1 = reuse whenever the window allows."""

    threshold: float = 0.25
    window: CacheWindow = field(default_factory=CacheWindow)

    kind = "fbcache"
    label = "FBCache"

    def validate(self) -> None:
        check_number("fbCacheThreshold", self.threshold, limits.CACHE_THRESHOLD)
        self.window.validate()

    def tag(self) -> str:
        return f"FB_t{self.threshold:g}_{self.window.tag()}"


@dataclass(frozen=True)
class TeaCacheConfig:
    """TeaCache: the relative L1 change of a cheap per-step input, rescaled by a per-model
    polynomial, is accumulated over steps; while the sum stays below ``distance`` the whole
    transformer is skipped and the cached whole-model residual added. Default 0.5; 0 = never.

    The watched input is the one the published polynomials were fitted on (ComfyUI-TeaCache):
    HiDream Full the timestep embedding, Dev/Fast the embedded image tokens. ``coefficients``
    (highest power first) default to the published polynomial of the loaded variant. The
    rescaled value is taken by magnitude: the Full polynomial turns negative above a change
    of ~0.065, and a big change must never count as "no change"."""

    distance: float = 0.5
    coefficients: tuple[float, ...] | None = None
    window: CacheWindow = field(default_factory=CacheWindow)

    kind = "teacache"
    label = "TeaCache"

    def validate(self) -> None:
        check_number("teaCacheDistance", self.distance, limits.CACHE_THRESHOLD)
        if self.coefficients is not None:
            if not 1 <= len(self.coefficients) <= 10:
                raise ValueError(
                    f"coefficients: {len(self.coefficients)} values given; allowed 1..10 (highest power first)"
                )
            for i, c in enumerate(self.coefficients):
                if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c):
                    raise ValueError(f"coefficients[{i}]: {c!r} is not a finite number")
        self.window.validate()

    def polynomial(self, variant: str) -> tuple[float, ...]:
        return self.coefficients if self.coefficients is not None else TEACACHE_COEFFICIENTS[variant]

    def tag(self) -> str:
        return f"TEA_d{self.distance:g}_{self.window.tag()}"


@dataclass(frozen=True)
class DBCacheConfig:
    """DBCache (dual block cache, as in cache-dit): per block list (HiDream's double-stream
    blocks, then its single-stream blocks, each deciding on its own like cache-dit's
    contexts), the first ``front_blocks`` (Fn) always run and their residual decides (image
    tokens in the double list, the whole image+text sequence in the single list, as
    cache-dit measures them); on a hit the cached residual of the middle blocks is added, and
    the last ``back_blocks`` (Bn) always run. Fn + Bn must leave a middle block in each list.

    Refresh (Runware ``dbCacheSkipInterval`` = R, default 5): counting from the last step
    before the window (a computed step; step 0 when the window starts at 0 or 1), every
    (R+1)-th step is forced to compute, so at most R steps are skipped between refreshes and
    a higher R skips more. R >= steps never forces anything (how the benchmark matches
    cache-dit, which has no such rule). Default threshold 0.25; 0 = never, 1 = always."""

    threshold: float = 0.25
    front_blocks: int = 1
    back_blocks: int = 0
    refresh_interval: int = 5
    window: CacheWindow = field(default_factory=CacheWindow)

    kind = "dbcache"
    label = "DBCache"

    def validate(self) -> None:
        check_number("dbCacheThreshold", self.threshold, limits.CACHE_THRESHOLD)
        check_int("front_blocks (Fn)", self.front_blocks, limits.DBCACHE_FRONT_BLOCKS)
        check_int("back_blocks (Bn)", self.back_blocks, limits.DBCACHE_BACK_BLOCKS)
        check_int("dbCacheSkipInterval", self.refresh_interval, limits.CACHE_REFRESH_INTERVAL)
        self.window.validate()

    def tag(self) -> str:
        return (
            f"DB_F{self.front_blocks}B{self.back_blocks}_t{self.threshold:g}"
            f"_R{self.refresh_interval}_{self.window.tag()}"
        )


BLOCK_CACHES = (FirstBlockCacheConfig, DBCacheConfig)


def check_configs(configs: tuple, steps: int) -> None:
    """Every check a set of caches needs, run before any model work: each config's own
    ranges, the combination, and each window against the run's step count. torch-free, so
    the Runware API refuses a bad task without building a cache session."""
    check_combination(configs)
    for config in configs:
        config.validate()
        config.window.resolve(steps)


def check_combination(configs: tuple) -> None:
    """TeaCache composes with one block cache; First Block Cache + DBCache is an error."""
    kinds = [c.kind for c in configs]
    if "fbcache" in kinds and "dbcache" in kinds:
        raise ValueError(
            "cache: First Block Cache and DBCache both act on the transformer blocks and cannot run "
            "together; keep one of them (TeaCache may be combined with either)"
        )
