"""Runs a validated Runware ``imageInference`` task with the engine, start to finish.

Order matters: everything that can be wrong with a task (its fields, its LoRA files, its
cache options against its step count, a missing safety detector) is checked in
``prepare`` before any model work; images are saved before any delivery; a failed delivery
is reported, never fatal. ``cost`` is measured generation seconds times a price per hour
that the caller sets (default 0), never an invented figure.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cache.config import check_configs
from ..model.handle import HiDreamModel, TextEncoders, VaeHandle
from ..sampling.loop import SampleSettings, sample_latents
from ..sampling.schedulers import SchedulerSpec, check_scheduler_name
from .task import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskModels:
    """The loaded models a task runs on (``runware:97@1`` = HiDream-I1 Full)."""

    model: HiDreamModel
    text: TextEncoders
    vae: VaeHandle


@dataclass(frozen=True)
class PreparedTask:
    """A task turned into engine inputs; building it does no model work."""

    task: Task
    model: HiDreamModel
    scheduler: SchedulerSpec
    settings: SampleSettings


@dataclass
class TaskRun:
    """What running one task produced."""

    responses: list[dict]
    seconds: float
    published: Any = None
    safety: list = field(default_factory=list)
    cache_report: str = ""
    images: Any = None  # IMAGE tensor as delivered (flagged images masked)

    def delivery_report(self) -> list[dict]:
        if self.published is None:
            return []
        return [d.to_dict() for d in self.published.deliveries]


def check_detector() -> None:
    """The safety detector imports, or a ValueError saying how to install it (before model work)."""
    from .safety import DetectorNotInstalledError, load_detector

    try:
        load_detector()  # a missing detector is an error that says how to install it, never a pass
    except DetectorNotInstalledError as exc:
        raise ValueError(str(exc)) from exc


def check_task(task: Task, lora_resolver: Callable[[str], Any] | None = None) -> tuple:
    """Everything about a task that needs no loaded model; returns its LoRA specs.

    LoRA names (resolved in the loras folder, header read), cache options against steps, the
    scheduler and the safety detector: a mistake here costs seconds, not a 20-30 s model load.
    """
    from ..lora.spec import lora_spec_from_task
    from ..model.checkpoint import read_header

    specs = []
    for i, entry in enumerate(task.lora):
        spec = lora_spec_from_task(entry, lora_resolver, field=f"lora[{i}]")
        read_header(Path(spec.path), f"lora[{i}].model")
        specs.append(spec)
    configs = task.accelerator_options.cache_configs()
    if configs:
        check_configs(configs, task.steps)
    if task.safety.check_content and task.safety.mode != "none":
        check_detector()
    check_scheduler_name(task.scheduler)
    check_targets(task)
    return tuple(specs)


def check_targets(task: Task) -> None:
    """Webhook and upload targets against the outbound policy (targets.py), before any work."""
    from . import targets

    for name, url in (("webhookURL", task.webhook_url), ("uploadEndpoint", task.upload_endpoint)):
        if url:
            targets.check_url(url, name)


def prepare(
    task: Task, models: TaskModels, lora_resolver: Callable[[str], Any] | None = None
) -> PreparedTask:
    """Check everything a task needs and build the patched model handle (no model work)."""
    model = models.model
    for spec in check_task(task, lora_resolver):
        model = model.with_lora(spec)
    configs = task.accelerator_options.cache_configs()
    if configs:
        for config in configs:
            model = model.with_cache(config)
    settings = SampleSettings(
        width=task.width,
        height=task.height,
        steps=task.steps,
        cfg=float(task.cfg_scale),
        seed=task.seed,
        batch=task.number_results,
    )
    return PreparedTask(task=task, model=model, scheduler=SchedulerSpec(task.scheduler), settings=settings)


def generate(prep: PreparedTask, models: TaskModels, callback=None) -> tuple[Any, float, str]:
    """Encode, sample and decode; returns (IMAGE tensor, seconds, cache report)."""
    from ..model.text import encode_prompts
    from ..model.vae import decode

    task = prep.task
    start = time.perf_counter()
    cond = encode_prompts(models.text, task.positive_prompt, task.negative_prompt or "")
    result = sample_latents(prep.model, cond, prep.scheduler, prep.settings, callback=callback)
    images = decode(models.vae, result.latents)
    return images, time.perf_counter() - start, result.report


def _check_safety(task: Task, images: Any, mask: str) -> tuple[Any, list, list[dict] | None]:
    if not task.safety.check_content:
        return images, [], None
    from .safety import check_and_mask, response_fields

    images, results = check_and_mask(images, task.safety.mode, mask)
    return images, results, [response_fields(r) for r in results]


def check_price(price_per_hour: Any, field_name: str = "price_per_hour") -> float:
    """A finite number >= 0: NaN or Infinity would print invalid JSON, a negative price a negative cost."""
    ok = isinstance(price_per_hour, (int, float)) and not isinstance(price_per_hour, bool)
    if not ok or not math.isfinite(price_per_hour) or price_per_hour < 0:
        raise ValueError(f"{field_name}: got {price_per_hour!r}; allowed: a finite number >= 0")
    return float(price_per_hour)


def _costs(task: Task, seconds: float, price_per_hour: float) -> list[float] | None:
    if not task.include_cost:
        return None
    per_image = seconds * price_per_hour / 3600.0 / task.number_results
    return [round(per_image, 6)] * task.number_results


def publish_images(
    prep: PreparedTask,
    images: Any,
    seconds: float,
    *,
    price_per_hour: float = 0.0,
    output_root: str | Path | None = None,
    file_urls: bool = False,
    base_url: str | None = None,
    safety_mask: str = "blur",
    retry: dict | None = None,
    sync_delivery: bool = False,
    defer_delivery: bool = False,
) -> tuple[Any, list, Any]:
    """Safety check, then save (always first), then deliver; returns (Published, safety, images)."""
    from .output import ImageMetadata, PublishOptions, publish

    task = prep.task
    images, safety, extra = _check_safety(task, images, safety_mask)
    overrides: dict[str, Any] = {"file_urls": file_urls, "base_url": base_url}
    if sync_delivery:
        overrides["delivery_method"] = "sync"
    published = publish(
        images,
        task.task_uuid,
        PublishOptions.from_task(task, **overrides),
        seeds=list(task.result_seeds()),
        costs=_costs(task, seconds, price_per_hour),
        metadata=ImageMetadata(parameters=task.to_dict()),
        root=output_root,
        retry=retry,
        extra=extra,
        defer_delivery=defer_delivery,
    )
    return published, safety, images


def run_task(
    task: Task,
    models: TaskModels,
    *,
    price_per_hour: float = 0.0,
    output_root: str | Path | None = None,
    file_urls: bool = False,
    base_url: str | None = None,
    lora_resolver: Callable[[str], Any] | None = None,
    safety_mask: str = "blur",
    callback=None,
    retry: dict | None = None,
) -> TaskRun:
    """Run one task synchronously (delivery may still be async if the task asks for it)."""
    check_price(price_per_hour)
    prep = prepare(task, models, lora_resolver)
    images, seconds, report = generate(prep, models, callback)
    published, safety, images = publish_images(
        prep,
        images,
        seconds,
        price_per_hour=price_per_hour,
        output_root=output_root,
        file_urls=file_urls,
        base_url=base_url,
        safety_mask=safety_mask,
        retry=retry,
    )
    return TaskRun(published.response_json(), seconds, published, safety, report, images)


# -- command line ------------------------------------------------------------------------

_PREFERRED = ("bf16", "fp16", "fp8")


def _pick(names: list[str], must: tuple[str, ...], field_name: str, folder: str) -> str:
    hits = [n for n in names if all(m in n.lower() for m in must)]
    if not hits:
        from ..model import paths

        searched = ", ".join(str(d) for d in paths.search_dirs(folder)) or f"no {folder} folder is configured"
        raise ValueError(
            f"{field_name}: no file matching *{'*'.join(must)}* for runware:97@1 (HiDream-I1 Full) "
            f"in {searched}; found: {', '.join(names) or 'nothing'}"
        )
    hits.sort(key=lambda n: next((i for i, p in enumerate(_PREFERRED) if p in n.lower()), len(_PREFERRED)))
    return hits[0]


def find_models(dtype: str = "bf16", weights_offload: bool = True) -> TaskModels:
    """Load HiDream-I1 Full from the models folder (ComfyUI's, or ``paths.set_models_dir``)."""
    from ..model import loading, paths

    def path(kind: str, name: str, field_name: str) -> Path:
        return paths.resolve_model(kind, name, field=field_name)

    diffusion = paths.list_models("diffusion_models")
    enc = paths.list_models("text_encoders")
    model = loading.load_transformer(
        path("diffusion_models", _pick(diffusion, ("hidream", "full"), "model", "diffusion_models"), "model"),
        variant="full",
        dtype=dtype,
        offload=weights_offload,
    )
    text = loading.load_text_encoders(
        clip_l=path("text_encoders", _pick(enc, ("clip_l",), "clip_l", "text_encoders"), "clip_l"),
        clip_g=path("text_encoders", _pick(enc, ("clip_g",), "clip_g", "text_encoders"), "clip_g"),
        t5=path("text_encoders", _pick(enc, ("t5",), "t5", "text_encoders"), "t5"),
        llama=path("text_encoders", _pick(enc, ("llama",), "llama", "text_encoders"), "llama"),
        dtype=dtype,
        offload=weights_offload,
    )
    vae_name = _pick(paths.list_models("vae"), ("ae",), "vae", "vae")
    vae = loading.load_vae(path("vae", vae_name, "vae"), dtype=dtype, offload=weights_offload)
    return TaskModels(model=model, text=text, vae=vae)
