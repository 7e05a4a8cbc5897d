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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.handle import HiDreamModel, TextEncoders, VaeHandle
from ..sampling.loop import SampleSettings, sample_latents
from ..sampling.schedulers import SchedulerSpec, validate_scheduler_name
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
        from ..cache.policy import open_cache_session

        open_cache_session(configs, variant="full", steps=task.steps)  # validates against steps
    if task.safety.check_content and task.safety.mode != "none":
        check_detector()
    validate_scheduler_name(task.scheduler)
    return tuple(specs)


def prepare(
    task: Task, models: TaskModels, lora_resolver: Callable[[str], Any] | None = None
) -> PreparedTask:
    """Check everything a task needs and build the patched model handle (no model work)."""
    model = models.model
    for spec in check_task(task, lora_resolver):
        model = model.with_lora(spec)
    configs = task.accelerator_options.cache_configs()
    if configs:
        from ..cache.policy import open_cache_session

        open_cache_session(configs, variant=model.variant, steps=task.steps)
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
        raise ValueError(f"{field_name}: got {price_per_hour!r}; expected a finite number >= 0")
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
        raise ValueError(
            f"{field_name}: no file in models/{folder} matches {'*'.join(must)} for runware:97@1 "
            f"(HiDream-I1 Full); found: {', '.join(names) or 'nothing'}"
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


def check_output_dir(root: str | Path) -> Path:
    """The folder images are saved in (``root/hidream``) exists or can be made, and takes files.

    Checked before any model work: an unusable folder found after generation loses the image.
    """
    from .output import PACK_SUBFOLDER

    folder = Path(root) / PACK_SUBFOLDER
    probe = folder / ".write-test"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"--output-dir: {str(root)!r} cannot hold images ({exc.strerror or exc}: {exc.filename or folder}); "
            "expected a writable folder"
        ) from exc
    return folder


def run_task_file(args: Any) -> int:
    """``python . run TASK.json``: one Runware response JSON line per result on stdout.

    Exit status: 0 when every task generated and delivered; 1 when any task failed (its
    webhook is told, Runware's error shape); 2 when the input was refused before any model work.
    """
    import sys

    from ..model import paths
    from .task import TaskValidationError, parse_tasks, read_task_file

    try:
        tasks = parse_tasks(read_task_file(args.task))
    except TaskValidationError as exc:
        print(f"task validation failed ({Path(args.task).name}):", *exc.errors, sep="\n  ", file=sys.stderr)
        return 2
    check_price(args.price_per_hour, "--price-per-hour")
    check_output_dir(args.output_dir)
    if args.models_dir:
        paths.set_models_dir(args.models_dir)
    for task in tasks:
        check_task(task)  # LoRA names, detector, caches: before the models load
    models = find_models(dtype=getattr(args, "dtype", "bf16"))
    preps = [prepare(task, models) for task in tasks]  # every task checked before any runs
    failed = [prep.task.task_uuid for prep in preps if not _run_prepared(prep, models, args)]
    if failed:
        print(f"error: {len(failed)} of {len(preps)} task(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _tell_failure(task: Task, message: str) -> None:
    """Log a task's failure and, when it has a webhook, post it there as Runware does."""
    from .delivery import error_payload, post_webhook

    log.error("task %s failed: %s", task.task_uuid, message)
    if task.webhook_url:
        result = post_webhook(task.webhook_url, error_payload(task.task_type, task.task_uuid, message))
        log.info("failure report: %s", json.dumps(result.to_dict()))


def _report_deliveries(published: Any) -> bool:
    """Log each delivery outcome (never "delivered" for a failure); True when all succeeded."""
    paths = {item.image_uuid: item.path for item in published.saved}
    ok = True
    for result in published.deliveries:
        if result.ok:
            log.info("delivered %s of result %s to %s", result.kind, result.image_uuid, result.url)
        else:
            ok = False
            log.error(
                "NOT delivered: %s of result %s to %s (%s); the image is kept at %s",
                result.kind,
                result.image_uuid,
                result.url,
                "; ".join(result.errors) or f"HTTP {result.status}",
                paths.get(result.image_uuid),
            )
    return ok


def _failure_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, (ValueError, TypeError)) else f"{type(exc).__name__}: {exc}"


def _run_prepared(prep: PreparedTask, models: TaskModels, args: Any) -> bool:
    """Generate, save, print, deliver one task; False when it failed (its webhook is told)."""
    from .delivery import deliver_async

    task = prep.task
    options = {
        "price_per_hour": args.price_per_hour,
        "output_root": args.output_dir,
        "file_urls": True,
    }

    def produce() -> Any:
        images, seconds, report = generate(prep, models)
        published, _, _ = publish_images(
            prep, images, seconds, sync_delivery=True, defer_delivery=True, **options
        )
        log.info(
            "task %s: %.1f s; %s; saved %s",
            task.task_uuid,
            seconds,
            report,
            [str(s.path) for s in published.saved],
        )
        return published

    if task.delivery_method == "async":
        box: list = []

        def work() -> list:
            box.append(produce())
            return box[0].deliver()

        handle = deliver_async(task.task_type, task.task_uuid, work)
        print(json.dumps(handle.ack[0]), flush=True)
        handle.wait()
        if handle.error:
            _tell_failure(task, handle.error)
            return False
        return _report_deliveries(box[0])
    try:
        published = produce()
    except Exception as exc:  # noqa: BLE001 - one failed task is reported (and its webhook told), the rest run
        _tell_failure(task, _failure_text(exc))
        return False
    for response in published.response_json():
        print(json.dumps(response), flush=True)  # the answer first: delivery may take minutes
    published.deliver()
    return _report_deliveries(published)
