"""The sampling loop: noise -> latents, at exactly the requested size.

One call samples ``batch`` images; image ``i`` starts from the noise of ``seed + i``
(drawn on the CPU, so the same seed gives the same image on any device) and equals a
single run with that seed, because images are sampled one after another with their own
generator (cond and uncond of one image run as one batch of two, as in diffusers).

Patches carried by the model handle are applied only inside this call: LoRA adapters are
switched per step by sigma (``hidream.lora.session.LoraSession``) and cache state lives in a
session created here (``hidream.cache.policy``); both are undone in ``finally`` blocks, so an
exception or a cancel leaves the shared weights as they were.

One transformer samples one call at a time (``_sampling_lock``): LoRA adapters, merged weight
copies, cache hooks and offload moves all act on the shared module, so a second caller (the
Runware API server, a user script, another thread) waits instead of seeing the first one's
LoRA in its image.

The result is in ComfyUI's LATENT convention: raw VAE-space latents (the Flux VAE's
scaling 0.3611 and shift 0.1159 undone), so ComfyUI's own VAEDecode decodes it too.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from ..forward.compile import graph_count
from ..forward.runner import TransformerRunner
from ..limits import BATCH, CFG, SEED, SIZE, STEPS, check_int, check_number
from ..model.devices import on_device
from ..model.handle import HiDreamModel
from ..model.text import Conditioning, PromptEmbeds
from .progress import Progress

log = logging.getLogger(__name__)

FLUX_VAE_SCALING = 0.3611
FLUX_VAE_SHIFT = 0.1159


@dataclass(frozen=True)
class SampleSettings:
    """The sampler node's numbers, validated by ``validate_settings``."""

    width: int = 1024
    height: int = 1024
    steps: int = 50
    cfg: float = 5.0
    seed: int = 0
    batch: int = 1


@dataclass
class SampleResult:
    """Raw VAE-space latents [B, 16, H/8, W/8] (fp32, CPU) plus what happened."""

    latents: torch.Tensor
    seconds: float
    telemetry: list[str] = field(default_factory=list)

    @property
    def report(self) -> str:
        return "\n".join(self.telemetry) if self.telemetry else "no cache: every step computed"


def validate_settings(s: SampleSettings) -> None:
    """Every number checked before any model work; errors name the field and the range."""
    for name in ("width", "height"):
        value = getattr(s, name)
        check_int(name, value, SIZE, SIZE.nearest(value))
    check_int("steps", s.steps, STEPS)
    check_number("cfg", s.cfg, CFG, " (<= 1 disables the negative prompt)")
    check_int("seed", s.seed, SEED)
    check_int("batch", s.batch, BATCH)


ModelFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def _embeds_for(cond: Conditioning, use_cfg: bool, device: torch.device, dtype: torch.dtype):
    """Stack [negative, positive] like the pipeline does when CFG is on."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    pos: PromptEmbeds = cond.positive
    if not use_cfg:
        return cast(pos.t5), cast(pos.llama), cast(pos.pooled)
    neg: PromptEmbeds = cond.negative
    return (
        cast(torch.cat([neg.t5, pos.t5], dim=0)),
        cast(torch.cat([neg.llama, pos.llama], dim=1)),
        cast(torch.cat([neg.pooled, pos.pooled], dim=0)),
    )


def _make_model_fn(
    runner: TransformerRunner, model: HiDreamModel, cond: Conditioning, cfg: float, cache
) -> ModelFn:
    """The velocity the samplers integrate: negated transformer output, CFG applied."""
    use_cfg = cfg > 1.0
    t5, llama, pooled = _embeds_for(cond, use_cfg, model.device, model.dtype)

    def model_fn(x: torch.Tensor, timestep: torch.Tensor, sigma: float) -> torch.Tensor:
        inp = torch.cat([x, x]) if use_cfg else x
        inp = inp.to(device=model.device, dtype=model.dtype)
        t = timestep.to(model.device).expand(inp.shape[0])
        policy = cache.policy() if cache is not None else None
        out = -runner.forward(inp, t, t5, llama, pooled, policy=policy)
        out = out.to(x.dtype)
        if not use_cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + cfg * (text - uncond)

    return model_fn


def _open_cache(model: HiDreamModel, steps: int):
    if not model.caches:
        return None
    from ..cache.policy import open_cache_session

    return open_cache_session(model.caches, variant=model.variant, steps=steps)


def _sample_one(
    runner: TransformerRunner,
    model: HiDreamModel,
    cond: Conditioning,
    scheduler,
    settings: SampleSettings,
    index: int,
    lora,
    progress: Progress,
    telemetry: list[str],
) -> torch.Tensor:
    """Sample image ``index`` of the batch from the noise of ``seed + index``."""
    from .schedulers import make_sampler

    gen = torch.Generator("cpu").manual_seed(settings.seed + index)
    shape = (1, runner.config.in_channels, settings.height // 8, settings.width // 8)
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(model.device)
    sampler = make_sampler(scheduler, model.variant, settings.steps)
    cache = _open_cache(model, settings.steps)
    model_fn = _make_model_fn(runner, model, cond, settings.cfg, cache)
    done_before = index * settings.steps

    def noise() -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(model.device)

    def on_step(i: int, sigma: float) -> None:
        progress.check_interrupt()
        if i > 0:
            progress.update(done_before + i)
        changed = lora.on_step(float(sigma)) if lora is not None else False
        if cache is not None:
            cache.begin_step(i, force_compute=changed)

    x = sampler.sample(model_fn, x, noise, on_step)
    progress.update(done_before + settings.steps)
    if cache is not None:
        line = cache.summary(runner.num_blocks)
        log.info("image %d: %s", index, line)
        telemetry.append(f"image {index}: {line}" if settings.batch > 1 else line)
    return x.float().cpu()


_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def _sampling_lock(transformer: torch.nn.Module) -> threading.Lock:
    """The lock that serialises sampling calls on one loaded transformer."""
    with _locks_guard:
        lock = _locks.get(transformer)
        if lock is None:
            lock = _locks[transformer] = threading.Lock()
        return lock


def sample_latents(
    model: HiDreamModel,
    cond: Conditioning,
    scheduler,
    settings: SampleSettings,
    callback: Callable[[int, int], None] | None = None,
) -> SampleResult:
    """Sample ``settings.batch`` images; returns raw VAE-space latents.

    ``scheduler`` is a ``hidream.sampling.schedulers.SchedulerSpec``. ``callback(done, total)`` is
    called after every step (outside ComfyUI; inside, ComfyUI's progress bar moves) and may
    raise to cancel.
    """
    from .schedulers import check_scheduler_name

    validate_settings(settings)
    check_scheduler_name(scheduler.name)
    _open_cache(model, settings.steps)  # bad cache options fail here, before any weight moves
    runner = TransformerRunner(model.transformer, compile=model.compile)
    progress = Progress(total=settings.steps * settings.batch, callback=callback)
    telemetry: list[str] = []
    start = time.perf_counter()
    images = []
    graphs_before = graph_count()
    lock = _sampling_lock(model.transformer)
    if not lock.acquire(blocking=False):
        log.info("another sampling call is using this model; waiting for it to finish")
        lock.acquire()
    with ExitStack() as stack, torch.no_grad():
        stack.callback(lock.release)
        stack.enter_context(on_device(model.transformer, model.device, model.offload))
        lora = None
        if model.loras:
            from ..lora.session import LoraSession

            lora = stack.enter_context(LoraSession(model.transformer, model.loras))
        else:
            from ..lora.session import release_unused

            release_unused(model.transformer)  # adapters of deleted LoRA nodes cost time even idle
        for index in range(settings.batch):
            images.append(
                _sample_one(runner, model, cond, scheduler, settings, index, lora, progress, telemetry)
            )
        if runner.compiled:
            log.info("compile=blocks: %d graph(s) compiled during this call", graph_count() - graphs_before)
    latents = torch.cat(images) / FLUX_VAE_SCALING + FLUX_VAE_SHIFT
    return SampleResult(latents=latents, seconds=time.perf_counter() - start, telemetry=telemetry)
