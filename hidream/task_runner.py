"""Runs a validated Runware ``imageInference`` task with the engine, start to finish.

Order matters: everything that can be wrong with a task (its fields, its LoRA files, its
cache options against its step count, a missing safety detector) is checked in
``prepare`` before any model work; images are saved before any delivery; a failed delivery
is reported, never fatal. ``cost`` is measured generation seconds times a price per hour
that the caller sets (default 0), never an invented figure.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .handle import HiDreamModel, TextEncoders, VaeHandle
from .sampling import SampleSettings, sample_latents
from .schedulers import SchedulerSpec, validate_scheduler_name
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


def prepare(
    task: Task, models: TaskModels, lora_resolver: Callable[[str], Any] | None = None
) -> PreparedTask:
    """Check everything a task needs and build the patched model handle (no model work)."""
    from .lora_spec import lora_spec_from_task

    model = models.model
    for i, entry in enumerate(task.lora):
        model = model.with_lora(lora_spec_from_task(entry, lora_resolver, field=f"lora[{i}]"))
    configs = task.accelerator_options.cache_configs()
    if configs:
        from .cache import open_cache_session

        open_cache_session(configs, variant=model.variant, steps=task.steps)  # validates against steps
        for config in configs:
            model = model.with_cache(config)
    if task.safety.check_content and task.safety.mode != "none":
        from .safety import load_detector

        load_detector()  # a missing detector is an error that says how to install it, never a pass
    validate_scheduler_name(task.scheduler)
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
    from .text import encode_prompts
    from .vae import decode

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
    if price_per_hour < 0:
        raise ValueError(f"price_per_hour: {price_per_hour} must be >= 0")
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
        raise ValueError(
            f"{field_name}: no file in models/{folder} matches {'*'.join(must)} for runware:97@1 "
            f"(HiDream-I1 Full); found: {', '.join(names) or 'nothing'}"
        )
    hits.sort(key=lambda n: next((i for i, p in enumerate(_PREFERRED) if p in n.lower()), len(_PREFERRED)))
    return hits[0]


def find_models(dtype: str = "bf16", weights_offload: bool = True) -> TaskModels:
    """Load HiDream-I1 Full from the models folder (ComfyUI's, or ``paths.set_models_dir``)."""
    from . import loading, paths

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


def run_task_file(args: Any) -> int:
    """``python . run TASK.json``: one Runware response JSON line per result on stdout."""
    import sys

    from . import paths
    from .task import TaskValidationError, parse_tasks

    try:
        tasks = parse_tasks(Path(args.task).read_text())
    except TaskValidationError as exc:
        print("task validation failed:", *exc.errors, sep="\n  ", file=sys.stderr)
        return 2
    if args.models_dir:
        paths.set_models_dir(args.models_dir)
    models = find_models(dtype=getattr(args, "dtype", "bf16"))
    preps = [prepare(task, models) for task in tasks]  # every task checked before any runs
    for prep in preps:
        _run_prepared(prep, models, args)
    return 0


def _run_prepared(prep: PreparedTask, models: TaskModels, args: Any) -> None:
    from .delivery import deliver_async

    options = {
        "price_per_hour": args.price_per_hour,
        "output_root": args.output_dir,
        "file_urls": True,
    }

    def work() -> list:
        images, seconds, _ = generate(prep, models)
        published, _, _ = publish_images(prep, images, seconds, sync_delivery=True, **options)
        for response in published.responses:
            log.info("delivered result %s", response.get("imageUUID"))
        return published.deliveries

    if prep.task.delivery_method == "async":
        handle = deliver_async(prep.task.task_type, prep.task.task_uuid, work)
        print(json.dumps(handle.ack[0]), flush=True)
        handle.wait()
        for result in handle.results:
            log.info("delivery: %s", json.dumps(result.to_dict()))
        if handle.error:
            log.error("task %s failed in the background: %s", prep.task.task_uuid, handle.error)
        return
    images, seconds, report = generate(prep, models)
    published, _, _ = publish_images(prep, images, seconds, **options)
    log.info("task %s: %.1f s; %s", prep.task.task_uuid, seconds, report)
    for response in published.response_json():
        print(json.dumps(response), flush=True)
    for result in published.deliveries:
        log.info("delivery: %s", json.dumps(result.to_dict()))
