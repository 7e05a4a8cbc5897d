"""Runware ``imageInference`` task schema for HiDream-I1 Full: parse, validate, default.

The contract is ``spec/runware-imageInference-hidream-i1-full.txt``. A task is checked as a
whole before any model work, and every problem of every task is reported at once (one
``TaskValidationError`` with ``.errors``), because a user fixing a JSON file by hand wants
the full list, not one error per run. Each message names the field path, the value and
what is allowed, e.g. ``lora[1].weight: got 5.0; allowed: a number from -4 to 4``.

Choices the spec leaves open (documented in the README):

- Integers given as integral floats (``30.0``) are accepted as ``30``; ``30.5`` is not.
  Booleans are never numbers, numbers are never booleans, strings are never numbers.
- ``positivePrompt``: 1..3000 characters, not only whitespace; ``negativePrompt``: 0..3000.
- ``steps`` <= 1000 and ``CFGScale`` <= 100: every range comes from ``hidream.limits``, the
  same one the sampler checks, so a valid task never fails there.
- ``CFGScale`` defaults to 5.0 (HiDream-I1 Full's published guidance scale); ``steps`` 30.
- ``scheduler`` defaults to ``Default`` (the model's own scheduler).
- An absent ``seed`` is drawn at parse time from 0..2**32-1 and returned in ``Task.seed``.
- ``ttl`` applies to the files this pack saves, whatever the ``outputType``.
- ``dbCacheSkipInterval`` <= 1000 (the engine's limit). Cache window fields are 0-based
  step indices, end exclusive (``hidream.cache.config.CacheWindow``).
- ``fbCache`` with ``dbCache`` is an error: both act on the transformer blocks.
"""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import limits
from ..limits import (
    BATCH,
    CACHE_THRESHOLD,
    CFG,
    DEFAULT_CFG,
    DEFAULT_QUALITY,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    DELIVERY_METHODS,
    LORA_STAGES,
    LORA_WEIGHT,
    OUTPUT_FORMATS,
    OUTPUT_TYPES,
    PROMPT_MAX_CHARS,
    QUALITY,
    RANDOM_SEED_MAX,
    SAFETY_MODES,
    SCHEDULER_NAMES,
    SEED,
    SIZE,
    STEPS,
    TTL,
    Range,
    as_int,
    describe_choices,
    problem,
)
from .delivery import redact_url, url_problem

TASK_TYPE = "imageInference"
MODEL_AIR = "runware:97@1"  # HiDream-I1 Full

_MISSING = object()


class TaskValidationError(ValueError):
    """All problems of a task (or of an array of tasks), one line each in ``.errors``."""

    def __init__(self, errors: list[str]) -> None:
        # Lone surrogates from the JSON (in unknown keys, say) would crash any print of the message.
        self.errors = [e.encode("utf-8", "backslashreplace").decode("utf-8") for e in errors]
        super().__init__(
            f"invalid Runware task ({len(self.errors)} problem(s)):\n  " + "\n  ".join(self.errors)
        )


@dataclass(frozen=True)
class TaskLora:
    """One ``lora`` entry: a LoRA name, its weight and the stage(s) it applies to."""

    model: str
    weight: float = 1.0
    transformer: str = "both"

    def to_dict(self) -> dict:
        return {"model": self.model, "weight": self.weight, "transformer": self.transformer}


@dataclass(frozen=True)
class Safety:
    """``safety``: ``check_content`` is on exactly when ``mode`` is ``fast``."""

    check_content: bool = False
    mode: str = "none"

    def to_dict(self) -> dict:
        return {"checkContent": self.check_content, "mode": self.mode}


_ACCEL_KEYS = {
    "fbCache": "fb_cache",
    "fbCacheThreshold": "fb_cache_threshold",
    "teaCache": "tea_cache",
    "teaCacheDistance": "tea_cache_distance",
    "dbCache": "db_cache",
    "dbCacheThreshold": "db_cache_threshold",
    "dbCacheSkipInterval": "db_cache_skip_interval",
    "cacheStartStep": "cache_start_step",
    "cacheEndStep": "cache_end_step",
    "cacheStartStepPercentage": "cache_start_step_percentage",
    "cacheEndStepPercentage": "cache_end_step_percentage",
    "cacheMaxConsecutiveSteps": "cache_max_consecutive_steps",
}


@dataclass(frozen=True)
class AcceleratorOptions:
    """``acceleratorOptions`` with the API defaults; window fields stay None when not given."""

    fb_cache: bool = False
    fb_cache_threshold: float = 0.25
    tea_cache: bool = False
    tea_cache_distance: float = 0.5
    db_cache: bool = False
    db_cache_threshold: float = 0.25
    db_cache_skip_interval: int = 5
    cache_start_step: int | None = None
    cache_end_step: int | None = None
    cache_start_step_percentage: int | None = None
    cache_end_step_percentage: int | None = None
    cache_max_consecutive_steps: int = 3

    @property
    def enabled(self) -> bool:
        return self.fb_cache or self.tea_cache or self.db_cache

    def cache_configs(self) -> tuple:
        """The engine's configs (``hidream.cache.config``) for the enabled caches, one shared window.

        TeaCache comes first: it decides whether the transformer runs at all, a block cache
        then acts inside the steps that do run.
        """
        from ..cache.config import CacheWindow, DBCacheConfig, FirstBlockCacheConfig, TeaCacheConfig

        window = CacheWindow(
            start_step=self.cache_start_step,
            end_step=self.cache_end_step,
            start_percent=self.cache_start_step_percentage,
            end_percent=self.cache_end_step_percentage,
            max_consecutive=self.cache_max_consecutive_steps,
        )
        out: list = []
        if self.tea_cache:
            out.append(TeaCacheConfig(distance=self.tea_cache_distance, window=window))
        if self.fb_cache:
            out.append(FirstBlockCacheConfig(threshold=self.fb_cache_threshold, window=window))
        if self.db_cache:
            out.append(
                DBCacheConfig(
                    threshold=self.db_cache_threshold,
                    refresh_interval=self.db_cache_skip_interval,
                    window=window,
                )
            )
        return tuple(out)

    def to_dict(self) -> dict:
        out = {}
        for api, attr in _ACCEL_KEYS.items():
            value = getattr(self, attr)
            if value is not None:
                out[api] = value
        return out


@dataclass(frozen=True)
class Task:
    """One validated ``imageInference`` task with every default filled in."""

    task_uuid: str
    positive_prompt: str
    seed: int
    task_type: str = TASK_TYPE
    model: str = MODEL_AIR
    negative_prompt: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG
    number_results: int = 1
    scheduler: str = "Default"
    lora: tuple[TaskLora, ...] = ()
    output_type: str = "URL"
    output_format: str = "JPG"
    output_quality: int = DEFAULT_QUALITY
    delivery_method: str = "sync"
    webhook_url: str | None = None
    upload_endpoint: str | None = None
    ttl: int | None = None
    include_cost: bool = False
    safety: Safety = field(default_factory=Safety)
    accelerator_options: AcceleratorOptions = field(default_factory=AcceleratorOptions)
    seed_was_random: bool = field(default=False, compare=False)

    def result_seeds(self) -> tuple[int, ...]:
        """Seed of result i is ``seed + i``, as the sampler draws it (may pass SEED_MAX by < 20)."""
        return tuple(self.seed + i for i in range(self.number_results))

    def to_dict(self) -> dict:
        """The task as Runware JSON with every default spelled out; parses back to an equal Task."""
        out: dict[str, Any] = {
            "taskType": self.task_type,
            "taskUUID": self.task_uuid,
            "model": self.model,
            "positivePrompt": self.positive_prompt,
            "negativePrompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "CFGScale": self.cfg_scale,
            "seed": self.seed,
            "numberResults": self.number_results,
            "scheduler": self.scheduler,
            "outputType": self.output_type,
            "outputFormat": self.output_format,
            "outputQuality": self.output_quality,
            "deliveryMethod": self.delivery_method,
            "includeCost": self.include_cost,
            "safety": self.safety.to_dict(),
        }
        if self.lora:
            out["lora"] = [entry.to_dict() for entry in self.lora]
        optional = {"webhookURL": self.webhook_url, "uploadEndpoint": self.upload_endpoint, "ttl": self.ttl}
        out.update({key: value for key, value in optional.items() if value is not None})
        accel = self.accelerator_options.to_dict()
        if accel != AcceleratorOptions().to_dict():
            out["acceleratorOptions"] = accel
        return out


_TASK_KEYS = [
    "taskType",
    "taskUUID",
    "model",
    "positivePrompt",
    "negativePrompt",
    "width",
    "height",
    "steps",
    "CFGScale",
    "seed",
    "numberResults",
    "scheduler",
    "lora",
    "outputType",
    "outputFormat",
    "outputQuality",
    "deliveryMethod",
    "webhookURL",
    "uploadEndpoint",
    "ttl",
    "includeCost",
    "safety",
    "acceleratorOptions",
]


class _Checker:
    """Reads fields of one JSON object, collecting every error instead of stopping at the first."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors

    def fail(self, path: str, value: Any, allowed: str) -> None:
        self.errors.append(problem(path, value, allowed, missing=value is _MISSING))

    def obj(self, value: Any, path: str, allowed: list[str]) -> dict | None:
        if not isinstance(value, dict):
            self.fail(path or "task", value, "a JSON object")
            return None
        for key in value:
            if key not in allowed:
                hint = limits.suggest(key, allowed)
                hint = f"; did you mean {hint!r}?" if hint else ""
                where = f"{path}.{key}" if path else str(key)
                self.errors.append(f"{where}: unknown field; allowed fields: {', '.join(allowed)}{hint}")
        return value

    def integer(self, data: dict, key: str, path: str, bounds: Range, default: Any) -> Any:
        value = data.get(key, _MISSING)
        allowed = bounds.describe(integer=True) + bounds.nearest(value)
        if value is _MISSING:
            if default is _MISSING:
                self.fail(path, value, allowed)
            return default
        number = as_int(value)
        if number is None or number not in bounds:
            self.fail(path, value, allowed)
            return None
        return number

    def number(self, data: dict, key: str, path: str, bounds: Range, default: Any) -> Any:
        value = data.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not limits.is_number(value) or value not in bounds:
            self.fail(path, value, bounds.describe(integer=False))
            return None
        return float(value)

    def boolean(self, data: dict, key: str, path: str, default: bool) -> Any:
        value = data.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.fail(path, value, "true or false")
            return None
        return value

    def choice(self, data: dict, key: str, path: str, allowed: tuple[str, ...], default: Any) -> Any:
        value = data.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                self.fail(path, value, describe_choices(allowed))
            return default
        if not isinstance(value, str) or value not in allowed:
            self.fail(path, value, describe_choices(allowed, value))
            return None
        return value

    def text(self, data: dict, key: str, path: str, min_len: int, default: Any) -> Any:
        value = data.get(key, _MISSING)
        expected = f"a string of {min_len}..{PROMPT_MAX_CHARS} characters" + (
            ", not only whitespace" if min_len else ""
        )
        if value is _MISSING:
            if default is _MISSING:
                self.fail(path, value, expected)
            return default
        if not isinstance(value, str) or len(value) > PROMPT_MAX_CHARS or len(value.strip()) < min_len:
            self.fail(path, value, expected)
            return None
        return self.unicode(value, path)

    def unicode(self, value: str, path: str) -> Any:
        """``value`` when it is valid Unicode text; a lone surrogate (``"\\ud800"``) cannot be encoded."""
        bad = _lone_surrogate(value)
        if bad is None:
            return value
        self.errors.append(
            f"{path}: got a lone surrogate {ascii(value[bad])} at character {bad}; allowed: valid Unicode text"
        )
        return None

    def url(self, data: dict, key: str, path: str) -> Any:
        value = data.get(key, _MISSING)
        if value is _MISSING:
            return None
        problem = url_problem(value)
        if problem is None and _lone_surrogate(value) is not None:
            problem = "contains a lone surrogate"
        if problem:
            shown = redact_url(value) if isinstance(value, str) else value
            self.fail(path, shown, f"an http:// or https:// URL ({problem})")
            return _MISSING
        return value


def _lone_surrogate(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (a lone surrogate), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _parse_lora(check: _Checker, value: Any) -> tuple[TaskLora, ...]:
    if not isinstance(value, list) or not value:
        check.fail("lora", value, "an array of at least 1 object {model, weight, transformer}")
        return ()
    out = []
    for i, item in enumerate(value):
        path = f"lora[{i}]"
        entry = check.obj(item, path, ["model", "weight", "transformer"])
        if entry is None:
            continue
        name = entry.get("model", _MISSING)
        if not isinstance(name, str) or not name.strip():
            check.fail(f"{path}.model", name, "a non-empty LoRA name")
        elif check.unicode(name, f"{path}.model") is None:
            name = None
        weight = check.number(entry, "weight", f"{path}.weight", LORA_WEIGHT, 1.0)
        stage = check.choice(entry, "transformer", f"{path}.transformer", LORA_STAGES, "both")
        if isinstance(name, str) and name.strip() and weight is not None and stage is not None:
            out.append(TaskLora(model=name, weight=weight, transformer=stage))
    return tuple(out)


def _parse_safety(check: _Checker, value: Any) -> Safety:
    data = check.obj(value, "safety", ["checkContent", "mode"])
    if data is None:
        return Safety()
    check_content = check.boolean(data, "checkContent", "safety.checkContent", False)
    mode = check.choice(data, "mode", "safety.mode", SAFETY_MODES, None)
    if check_content is None or ("mode" in data and mode is None):
        return Safety()
    if mode is None:  # not given: checkContent true means fast, as the spec says
        return Safety(check_content, "fast" if check_content else "none")
    if "checkContent" in data and check_content != (mode == "fast"):
        check.fail(
            "safety.mode",
            mode,
            f"{'fast' if check_content else 'none'} when checkContent is {json.dumps(check_content)}",
        )
        return Safety()
    return Safety(mode == "fast", mode)


# What runware 0.5.24's typed ``IAcceleratorOptions`` sends for fields the spec spells otherwise.
OLD_SDK_ACCEL_ALIASES = {
    "fbcache": "fbCache",
    "cacheDistance": "fbCacheThreshold",
    "cacheStopStep": "cacheEndStep",
}


def _old_sdk_spelling(check: _Checker, value: Any) -> tuple[Any, dict[str, str]]:
    """``acceleratorOptions`` with the old SDK's spellings read as the spec's fields.

    Returns the renamed object and, per spec field, the name the client sent. Its
    ``deepCache`` (a UNet cache, nothing a transformer has) is accepted only as ``false``.
    """
    if not isinstance(value, dict):
        return value, {}
    out: dict[str, Any] = {}
    sent: dict[str, str] = {}
    for key, item in value.items():
        if key == "deepCache":
            if item is not False:
                check.fail(
                    "acceleratorOptions.deepCache",
                    item,
                    "false (DeepCache caches a UNet's blocks; for HiDream-I1 use fbCache, teaCache or dbCache)",
                )
            continue
        spec = OLD_SDK_ACCEL_ALIASES.get(key)
        if spec is None:
            out[key] = item
        elif spec in value:
            check.errors.append(
                f"acceleratorOptions.{key}: given together with {spec}, the same field in the spec's "
                "spelling; allowed: one of the two"
            )
        else:
            out[spec] = item
            sent[spec] = key
    return out, sent


def _parse_accelerator(check: _Checker, value: Any, steps: int | None) -> AcceleratorOptions:
    value, sent = _old_sdk_spelling(check, value)
    data = check.obj(value, "acceleratorOptions", list(_ACCEL_KEYS))
    if data is None:
        return AcceleratorOptions()
    p = "acceleratorOptions."

    def name(key: str) -> str:  # errors name the field as the client spelt it
        return p + sent.get(key, key)

    before = len(check.errors)
    got = {
        "fb_cache": check.boolean(data, "fbCache", name("fbCache"), False),
        "fb_cache_threshold": check.number(
            data, "fbCacheThreshold", name("fbCacheThreshold"), CACHE_THRESHOLD, 0.25
        ),
        "tea_cache": check.boolean(data, "teaCache", name("teaCache"), False),
        "tea_cache_distance": check.number(
            data, "teaCacheDistance", name("teaCacheDistance"), CACHE_THRESHOLD, 0.5
        ),
        "db_cache": check.boolean(data, "dbCache", name("dbCache"), False),
        "db_cache_threshold": check.number(
            data, "dbCacheThreshold", name("dbCacheThreshold"), CACHE_THRESHOLD, 0.25
        ),
        "db_cache_skip_interval": check.integer(
            data, "dbCacheSkipInterval", name("dbCacheSkipInterval"), limits.CACHE_REFRESH_INTERVAL, 5
        ),
        "cache_start_step": check.integer(
            data, "cacheStartStep", name("cacheStartStep"), limits.CACHE_START_STEP, None
        ),
        "cache_end_step": check.integer(
            data, "cacheEndStep", name("cacheEndStep"), limits.CACHE_END_STEP, None
        ),
        "cache_start_step_percentage": check.integer(
            data,
            "cacheStartStepPercentage",
            name("cacheStartStepPercentage"),
            limits.CACHE_START_PERCENT,
            None,
        ),
        "cache_end_step_percentage": check.integer(
            data, "cacheEndStepPercentage", name("cacheEndStepPercentage"), limits.CACHE_END_PERCENT, None
        ),
        "cache_max_consecutive_steps": check.integer(
            data,
            "cacheMaxConsecutiveSteps",
            name("cacheMaxConsecutiveSteps"),
            limits.CACHE_MAX_CONSECUTIVE,
            limits.DEFAULT_CACHE_MAX_CONSECUTIVE,
        ),
    }
    if got["fb_cache"] and got["db_cache"]:
        check.errors.append(
            f"{name('dbCache')}: got true while fbCache is true; allowed: at most one block cache "
            "(fbCache or dbCache; either may be combined with teaCache)"
        )
    absolute = [k for k in ("cacheStartStep", "cacheEndStep") if k in data]
    percent = [k for k in ("cacheStartStepPercentage", "cacheEndStepPercentage") if k in data]
    if absolute and percent:
        check.errors.append(
            f"{name(percent[0])}: got {limits.show(data[percent[0]])} together with {', '.join(absolute)}; "
            "expected either absolute steps or percentages, not both"
        )
    start, end = got["cache_start_step"], got["cache_end_step"]
    if start is not None and end is not None and start >= end:
        check.fail(name("cacheEndStep"), end, f"an integer greater than cacheStartStep ({start})")
    if end is not None and steps is not None and end > steps:
        check.fail(name("cacheEndStep"), end, f"an integer <= steps ({steps})")
    if start is not None and end is None and steps is not None and start >= steps:
        check.fail(name("cacheStartStep"), start, f"an integer < steps ({steps})")
    s_pct, e_pct = got["cache_start_step_percentage"], got["cache_end_step_percentage"]
    if s_pct is not None and e_pct is not None and s_pct >= e_pct:
        check.fail(
            name("cacheEndStepPercentage"),
            e_pct,
            f"an integer greater than cacheStartStepPercentage ({s_pct})",
        )
    if len(check.errors) > before:
        return AcceleratorOptions()
    return AcceleratorOptions(**got)


def is_uuid4(value: Any) -> bool:
    """True for a canonical UUID version 4 string (any letter case)."""
    if not isinstance(value, str):
        return False
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return False
    return parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == value.lower()


def _parse_one(raw: Any, errors: list[str]) -> Task | None:
    check = _Checker(errors)
    data = check.obj(raw, "", _TASK_KEYS)
    if data is None:
        return None
    before = len(errors)
    check.choice(data, "taskType", "taskType", (TASK_TYPE,), _MISSING)
    task_uuid = data.get("taskUUID", _MISSING)
    if not is_uuid4(task_uuid):
        check.fail("taskUUID", task_uuid, "a UUID v4 string like 'c02c8676-a2cb-4b12-8e53-09cc6cd14f84'")
    check.choice(data, "model", "model", (MODEL_AIR,), _MISSING)
    v: dict[str, Any] = {
        "positive_prompt": check.text(data, "positivePrompt", "positivePrompt", 1, _MISSING),
        "negative_prompt": check.text(data, "negativePrompt", "negativePrompt", 0, ""),
        "steps": check.integer(data, "steps", "steps", STEPS, DEFAULT_STEPS),
        "cfg_scale": check.number(data, "CFGScale", "CFGScale", CFG, DEFAULT_CFG),
        "number_results": check.integer(data, "numberResults", "numberResults", BATCH, 1),
        "output_type": check.choice(data, "outputType", "outputType", OUTPUT_TYPES, "URL"),
        "output_format": check.choice(data, "outputFormat", "outputFormat", OUTPUT_FORMATS, "JPG"),
        "output_quality": check.integer(data, "outputQuality", "outputQuality", QUALITY, DEFAULT_QUALITY),
        "delivery_method": check.choice(data, "deliveryMethod", "deliveryMethod", DELIVERY_METHODS, "sync"),
        "webhook_url": check.url(data, "webhookURL", "webhookURL"),
        "upload_endpoint": check.url(data, "uploadEndpoint", "uploadEndpoint"),
        "ttl": check.integer(data, "ttl", "ttl", TTL, None),
        "include_cost": check.boolean(data, "includeCost", "includeCost", False),
    }
    for key in ("width", "height"):
        v[key] = check.integer(data, key, key, SIZE, DEFAULT_SIZE)
    seed = data.get("seed", _MISSING)
    was_random = seed is _MISSING
    v["seed"] = secrets.randbelow(RANDOM_SEED_MAX + 1) if was_random else as_int(seed)
    if v["seed"] is None or v["seed"] not in SEED:
        check.fail("seed", seed, SEED.describe(integer=True))
    if "scheduler" in data:
        v["scheduler"] = check.choice(data, "scheduler", "scheduler", SCHEDULER_NAMES, _MISSING)
    if "lora" in data:
        v["lora"] = _parse_lora(check, data["lora"])
    if "safety" in data:
        v["safety"] = _parse_safety(check, data["safety"])
    if "acceleratorOptions" in data:
        v["accelerator_options"] = _parse_accelerator(check, data["acceleratorOptions"], v["steps"])
    if v["delivery_method"] == "async" and not (v["webhook_url"] or v["upload_endpoint"]):
        check.fail(
            "deliveryMethod",
            "async",
            "'sync' unless webhookURL or uploadEndpoint is given (results need a destination)",
        )
    if len(errors) > before:
        return None
    return Task(task_uuid=task_uuid, seed_was_random=was_random, **v)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def load_json(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, no duplicate keys (the last one would silently win)."""
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except ValueError as exc:
        raise TaskValidationError([f"task JSON: {exc}"]) from exc
    except RecursionError as exc:
        raise TaskValidationError(
            ["task JSON: nested too deeply (a task is at most a few levels deep)"]
        ) from exc


def read_task_file(path: str | Path) -> str:
    """A task file's text; a folder, unreadable bytes or invalid UTF-8 give one line naming the file.

    A UTF-8 byte order mark (Windows editors write one) is accepted and dropped.
    """
    p = Path(path)
    try:
        if p.is_dir():
            raise TaskValidationError([f"task file {str(p)!r}: is a folder; allowed: a task JSON file"])
        raw = p.read_bytes()
    except OSError as exc:
        raise TaskValidationError([f"task file {str(p)!r}: cannot be read ({exc.strerror or exc})"]) from exc
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskValidationError(
            [f"task file {p.name!r}: byte {exc.start} is not valid UTF-8; allowed: a UTF-8 JSON file"]
        ) from exc


def _in_array(index: int, error: str) -> str:
    """``steps: ...`` -> ``tasks[2].steps: ...``; ``task: ...`` -> ``tasks[2]: ...``."""
    if error.startswith("task:"):
        return f"tasks[{index}]{error[4:]}"
    return f"tasks[{index}].{error}"


def parse_tasks(data: str | bytes | dict | list) -> list[Task]:
    """Validate one task or an array of tasks; raise ``TaskValidationError`` with every problem.

    Errors of an array are prefixed ``tasks[i].``; task UUIDs must be unique in the array.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise TaskValidationError([f"task JSON: byte {exc.start} is not valid UTF-8"]) from exc
    if isinstance(data, str):
        data = load_json(data)
    if isinstance(data, dict):
        errors: list[str] = []
        task = _parse_one(data, errors)
        if errors:
            raise TaskValidationError(errors)
        return [task]
    if not isinstance(data, list) or not data:
        raise TaskValidationError(
            [f"task: got {limits.show(data)}; allowed: a task object or a non-empty array of them"]
        )
    all_errors: list[str] = []
    tasks: list[Task] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(data):
        errors = []
        task = _parse_one(raw, errors)
        all_errors.extend(_in_array(i, e) for e in errors)
        uid = raw.get("taskUUID") if isinstance(raw, dict) else None
        if isinstance(uid, str) and uid.lower() in seen:
            all_errors.append(
                f"tasks[{i}].taskUUID: got {limits.show(uid)}; allowed: a UUID not already used by tasks[{seen[uid.lower()]}]"
            )
        elif isinstance(uid, str):
            seen[uid.lower()] = i
        if task is not None:
            tasks.append(task)
    if all_errors:
        raise TaskValidationError(all_errors)
    return tasks
