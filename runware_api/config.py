"""Server-side settings of the Runware API: the API key and which files serve ``runware:97@1``.

Both live in ``<ComfyUI user folder>/hidream_runware/`` (``user/hidream_runware/`` by default).
That folder is beside the per-user folders (``user/default/``), which ComfyUI's ``/userdata``
route serves; it is not inside one, so the key file cannot be downloaded through ComfyUI.

- ``api_key``: one key per line (blank lines and ``#`` comments ignored). The environment
  variable ``HIDREAM_RUNWARE_API_KEY`` adds one more. No key at all: the API is off.
  Both are re-read when they change, so a key can be set or rotated without a restart.
- ``models.json``: ``{"runware:97@1": {...files and options...}, "loras": {AIR id: file},
  "pricePerHour": 0}``. Missing file or entry: the files are picked from the model folders
  as ``python . run`` does. Loaded models are kept and reused while the entry is unchanged.
  ``allowTargets`` / ``denyTargets`` (CIDRs, host names) widen or narrow the outbound target
  policy (hidream/runware/targets.py) for every webhook and upload of this ComfyUI.

Keys are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..hidream.runware import targets
from ..hidream.runware.targets import TargetPolicy
from ..hidream.runware.task import MODEL_AIR
from .guard import Limits

log = logging.getLogger(__name__)

KEY_ENV = "HIDREAM_RUNWARE_API_KEY"
FOLDER = "hidream_runware"
KEY_FILE = "api_key"
MODELS_FILE = "models.json"
FILE_FIELDS = ("model", "clip_l", "clip_g", "t5", "llama", "vae")
OPTION_FIELDS = {"dtype": ("bf16", "fp16", "fp32"), "weights": ("gpu", "offload")}
_ENTRY_FIELDS = (*FILE_FIELDS, *OPTION_FIELDS, "fp8_weights")
_user_dir_override: Path | None = None


def set_user_dir(path: str | os.PathLike | None) -> None:
    """Use this folder instead of ComfyUI's user folder (tests and the benchmark)."""
    global _user_dir_override
    _user_dir_override = None if path is None else Path(path)


def settings_dir() -> Path:
    """``<ComfyUI user folder>/hidream_runware``."""
    if _user_dir_override is not None:
        return _user_dir_override / FOLDER
    import folder_paths  # type: ignore[import-not-found]

    return Path(folder_paths.get_user_directory()) / FOLDER


class _FileCache:
    """Re-reads a small file only when its modification time or size changes."""

    def __init__(self) -> None:
        self._stamp: tuple | None = None
        self._value: Any = None
        self._lock = threading.Lock()

    def get(self, path: Path, parse) -> Any:
        try:
            st = path.stat()
            stamp: tuple | None = (str(path), st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (str(path), None)
        with self._lock:
            if stamp != self._stamp:
                self._value = parse(path) if stamp[1] is not None else parse(None)
                self._stamp = stamp
            return self._value


_keys_cache = _FileCache()
_models_cache = _FileCache()


def _parse_keys(path: Path | None) -> tuple[str, ...]:
    if path is None:
        return ()
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(k for k in (line.strip() for line in lines) if k and not k.startswith("#"))


def configured_keys() -> tuple[str, ...]:
    """Every accepted key: the file's lines plus $HIDREAM_RUNWARE_API_KEY."""
    keys = _keys_cache.get(settings_dir() / KEY_FILE, _parse_keys)
    env = os.environ.get(KEY_ENV, "").strip()
    return (*keys, env) if env else keys


def api_enabled() -> bool:
    return bool(configured_keys())


def check_key(given: Any) -> str:
    """``ok``, ``missing`` or ``invalid`` (constant-time comparison against every key)."""
    if not isinstance(given, str) or not given:
        return "missing"
    candidate = given.encode("utf-8", "replace")
    ok = False
    for key in configured_keys():
        ok |= hmac.compare_digest(candidate, key.encode("utf-8"))
    return "ok" if ok else "invalid"


def images_root() -> Path:
    """Where API images are saved (under ``hidream/``): the user folder, which neither ComfyUI's
    ``/view`` nor ``/userdata`` serves, so only ``/runware/v1/image`` hands them out, within ttl."""
    return settings_dir() / "images"


def key_owner(given: str) -> str:
    """A stable, non-reversible name for an accepted key (per-key limits; never logged as the key)."""
    import hashlib

    return hashlib.sha256(given.encode("utf-8", "replace")).hexdigest()[:16]


def restart_mode() -> str:
    """``rerun`` (default) or ``fail``: ``models.json``'s ``onRestart``."""
    try:
        return settings().on_restart
    except ValueError:
        return "rerun"


def current_limits() -> Limits:
    """The limits of ``models.json``, or the defaults while it is missing or broken."""
    try:
        return settings().limits
    except ValueError:
        return Limits()


@dataclass(frozen=True)
class ModelEntry:
    """The files and options serving ``runware:97@1``; names are relative to the model folders."""

    model: str | None = None
    clip_l: str | None = None
    clip_g: str | None = None
    t5: str | None = None
    llama: str | None = None
    vae: str | None = None
    dtype: str = "bf16"
    weights: str = "offload"
    fp8_weights: bool = False


@dataclass(frozen=True)
class ApiSettings:
    """What ``models.json`` says, checked."""

    entry: ModelEntry
    loras: dict[str, str]
    price_per_hour: float = 0.0
    targets: TargetPolicy = TargetPolicy()
    limits: Limits = Limits()
    on_restart: str = "rerun"  # what a restart does with unfinished tasks: rerun or fail


def _check_entry(raw: Any, where: str) -> ModelEntry:
    if not isinstance(raw, dict):
        raise ValueError(
            f"{where}: got {type(raw).__name__}; allowed: an object of {', '.join(_ENTRY_FIELDS)}"
        )
    unknown = sorted(set(raw) - set(_ENTRY_FIELDS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field; allowed: {', '.join(_ENTRY_FIELDS)}")
    for name in FILE_FIELDS:
        value = raw.get(name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{where}.{name}: got {value!r}; allowed: a file name in the model folder")
    for name, allowed in OPTION_FIELDS.items():
        if name in raw and raw[name] not in allowed:
            raise ValueError(f"{where}.{name}: got {raw[name]!r}; allowed: one of {', '.join(allowed)}")
    if "fp8_weights" in raw and not isinstance(raw["fp8_weights"], bool):
        raise ValueError(f"{where}.fp8_weights: got {raw['fp8_weights']!r}; allowed: true or false")
    return ModelEntry(**raw)


def parse_settings(data: Any, source: str = MODELS_FILE) -> ApiSettings:
    """Check a ``models.json`` document; errors name the file and the field."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: got {type(data).__name__}; allowed: a JSON object")
    allowed = (MODEL_AIR, "loras", "pricePerHour", "allowTargets", "denyTargets", "limits", "onRestart")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(
            f"{source}: {unknown[0]!r} is not served; this pack runs only {MODEL_AIR} "
            f"(allowed keys: {', '.join(allowed)})"
        )
    entry = _check_entry(data.get(MODEL_AIR, {}), f"{source}: {MODEL_AIR}")
    loras = data.get("loras", {})
    if not isinstance(loras, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in loras.items()
    ):
        raise ValueError(f"{source}: loras: expected an object mapping AIR ids to file names in models/loras")
    price = data.get("pricePerHour", 0.0)
    if isinstance(price, bool) or not isinstance(price, (int, float)) or not 0 <= price < 1e6:
        raise ValueError(f"{source}: pricePerHour: got {price!r}; allowed: a number >= 0")
    lists = {}
    for key in ("allowTargets", "denyTargets"):
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{source}: {key}: got {value!r}; allowed: a list of CIDRs and host names")
        lists[key] = value
    policy = TargetPolicy.parse(
        lists["allowTargets"], lists["denyTargets"], source=f"{source}: allowTargets/denyTargets"
    )
    limits = Limits.parse(data.get("limits"), f"{source}: limits")
    on_restart = data.get("onRestart", "rerun")
    if on_restart not in ("rerun", "fail"):
        raise ValueError(f"{source}: onRestart: got {on_restart!r}; allowed: rerun, fail")
    return ApiSettings(
        entry=entry,
        loras=dict(loras),
        price_per_hour=float(price),
        targets=policy,
        limits=limits,
        on_restart=on_restart,
    )


def _read_settings(path: Path | None) -> ApiSettings | ValueError:
    if path is None:
        return ApiSettings(entry=ModelEntry(), loras={})
    try:
        return parse_settings(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return ValueError(f"{path.name}: {exc}" if not str(exc).startswith(path.name) else str(exc))


def settings() -> ApiSettings:
    """The current ``models.json`` (re-read when it changes); raises ValueError when it is broken."""
    value = _models_cache.get(settings_dir() / MODELS_FILE, _read_settings)
    if isinstance(value, ValueError):
        raise value
    targets.configure("api", value.targets)  # webhooks and uploads of this ComfyUI follow it
    return value


def lora_resolver(loras: dict[str, str]):
    """Maps a task's LoRA ``model`` (an AIR id) to its file in ``models/loras`` via ``models.json``."""
    from ..hidream.model import paths

    def resolve(name: str) -> Path:
        if name not in loras:  # the configured ids are the operator's business, not a caller's
            raise ValueError(
                f"lora_name: {name!r} is not a LoRA this server knows; allowed: an AIR id that the "
                f'server\'s {MODELS_FILE} lists under "loras"'
            )
        try:
            return paths.resolve_model("loras", loras[name], field=f"{MODELS_FILE} loras[{name!r}]")
        except ValueError as exc:  # the operator's mistake: details to the log, none to the caller
            log.error("Runware API: %s", exc)
            raise ServerConfigError(
                f"lora_name: {name!r} is configured in the server's {MODELS_FILE}, but its file is "
                "missing or unusable; the server's log says which"
            ) from exc

    return resolve


class ServerConfigError(ValueError):
    """models.json names something that is not there: ``invalidModelConfiguration``, no listing."""


def resolve_files(entry: ModelEntry) -> dict[str, Path]:
    """Every file of the entry, picked like ``python . run`` where the entry leaves it out."""
    from ..hidream.model import paths
    from ..hidream.runware.run import _pick

    kinds = {
        "model": ("diffusion_models", ("hidream", "full")),
        "clip_l": ("text_encoders", ("clip_l",)),
        "clip_g": ("text_encoders", ("clip_g",)),
        "t5": ("text_encoders", ("t5",)),
        "llama": ("text_encoders", ("llama",)),
        "vae": ("vae", ("ae",)),
    }
    out = {}
    for name, (kind, must) in kinds.items():
        given = getattr(entry, name)
        chosen = given or _pick(paths.list_models(kind), must, name, kind)
        out[name] = paths.resolve_model(kind, chosen, field=f"{MODELS_FILE} {MODEL_AIR}.{name}")
    return out


class _ModelHolder:
    """Loaded models for one entry; a changed entry or file loads again (the old ones are dropped)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._models: Any = None
        self._lock = threading.Lock()

    def get(self, entry: ModelEntry) -> Any:
        from ..hidream.model import loading
        from ..hidream.runware.run import TaskModels

        files = resolve_files(entry)
        key = (entry, tuple((str(p), p.stat().st_mtime_ns) for p in files.values()))
        with self._lock:
            if key == self._key:
                return self._models
            offload = entry.weights == "offload"
            log.info("Runware API: loading %s from %s", MODEL_AIR, ", ".join(p.name for p in files.values()))
            model = loading.load_transformer(
                files["model"],
                variant="full",
                dtype=entry.dtype,
                offload=offload,
                field="runware_api_model",
                fp8_weights=entry.fp8_weights,
            )
            text = loading.load_text_encoders(
                files["clip_l"],
                files["clip_g"],
                files["t5"],
                files["llama"],
                dtype=entry.dtype,
                offload=offload,
            )
            vae = loading.load_vae(files["vae"], dtype=entry.dtype, offload=offload, field="runware_api_vae")
            self._models, self._key = TaskModels(model=model, text=text, vae=vae), key
            return self._models


MODELS = _ModelHolder()
