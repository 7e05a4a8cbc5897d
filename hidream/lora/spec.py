"""What one LoRA node (or Runware task ``lora`` entry) asks for: file, weight, stage, boundary
and how it merges; validated before any model work. ``hidream.lora.session`` applies these specs.

Every ``LoraSpec`` also counts itself live per path until it is garbage-collected, so the
adapter registry (``hidream.lora.session``) can free the adapters of files no spec names any more.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..limits import (
    DEFAULT_LORA_BOUNDARY,
    DEFAULT_LORA_STAGE,
    LORA_BOUNDARY,
    LORA_MERGE_MODES,
    LORA_STAGES,
    LORA_WEIGHT,
    check_choice,
    check_number,
)

STAGES = LORA_STAGES
DEFAULT_STAGE = DEFAULT_LORA_STAGE
DEFAULT_BOUNDARY = DEFAULT_LORA_BOUNDARY
MERGE_MODES = LORA_MERGE_MODES
DEFAULT_MERGE = "auto"
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def validate_lora(name: object, weight: object, stage: object, boundary: object) -> None:
    """Check one LoRA's inputs before any model work; errors name the input, the value and the range."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"lora_name: expected a LoRA file name from models/loras, got {name!r}")
    if name.lower().endswith(_PICKLE_SUFFIXES):
        raise ValueError(
            f"lora_name: {name!r} is not a .safetensors file; only .safetensors LoRAs are loaded "
            "(.ckpt/.pt/.bin files are pickles that can run code when opened)"
        )
    check_number("weight", weight, LORA_WEIGHT, " (0 = no effect, negative = steer away)")
    check_choice("stage", stage, STAGES)
    check_number("boundary", boundary, LORA_BOUNDARY, " (a sigma: high = sigma >= boundary, low = below)")


def validate_merge(merge: object) -> None:
    check_choice("merge_at_boundary", merge, MERGE_MODES)  # also refuses older workflows' booleans


def stage_includes(stage: str, sigma: float, boundary: float) -> bool:
    """Whether a LoRA of ``stage`` acts at ``sigma`` (high: sigma >= boundary, low: below, both: always)."""
    if stage == "high":
        return sigma >= boundary
    if stage == "low":
        return sigma < boundary
    return True


def stage_steps(sigmas: Sequence[float], stage: str, boundary: float = DEFAULT_BOUNDARY) -> list[int]:
    """Indices of the steps (by each step's starting sigma) on which ``stage`` is active."""
    return [i for i, s in enumerate(sigmas) if stage_includes(stage, float(s), boundary)]


# --- live spec counting (see module docstring: release) ---------------------------------------
# Finalizers run whenever the GC does, possibly inside a locked section of this very thread, so
# they only append to a deque (atomic); the counts are settled under the lock by normal code.

_live_lock = threading.Lock()
_live_paths: Counter = Counter()
_released: deque = deque()


def _track(spec: LoraSpec) -> None:
    with _live_lock:
        _live_paths[spec.path] += 1
    weakref.finalize(spec, _released.append, spec.path)


def is_live(path: str) -> bool:
    with _live_lock:
        while _released:
            gone = _released.popleft()
            _live_paths[gone] -= 1
            if _live_paths[gone] <= 0:
                del _live_paths[gone]
        return _live_paths.get(path, 0) > 0


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA as a model handle carries it: file, weight, stage and stage boundary.

    Args:
        path: resolved absolute path of a ``.safetensors`` file.
        weight: strength, -4..4 (0 = no effect, negative = steer away from the LoRA).
        stage: ``high`` (sigma >= boundary), ``low`` (sigma < boundary) or ``both``.
        boundary: sigma where the high stage ends and the low stage begins, in (0, 1).
        name: display name (the widget value or the task's ``model``).
        merge: ``merge_at_boundary``. ``on``: merge this LoRA into temporary copies of the
            weights it patches whenever the active set changes (plain-model speed for one extra
            copy of those weights; fp8-stored layers merge per call); ``auto`` (default): the
            same when the copy fits in free memory, else merged per call (one layer at a time,
            ``lora_apply.choose_merge``); ``off``: run it as live PEFT layers (no extra memory,
            the low-rank matmuls on every step).
    """

    path: str
    weight: float
    stage: str
    boundary: float = DEFAULT_BOUNDARY
    name: str = ""
    merge: str = DEFAULT_MERGE

    def __post_init__(self) -> None:
        validate_merge(self.merge)
        validate_lora(self.name or Path(str(self.path)).name, self.weight, self.stage, self.boundary)
        if not isinstance(self.path, str) or not os.path.isabs(self.path):
            raise ValueError(f"lora path: expected a resolved absolute path, got {self.path!r}")
        if not self.path.lower().endswith(".safetensors"):
            raise ValueError(
                f"lora_name: {self.path!r} is not a .safetensors file; only .safetensors LoRAs load"
            )
        _track(self)

    def active_at(self, sigma: float) -> bool:
        return stage_includes(self.stage, sigma, self.boundary)


Resolver = Callable[[str], Any]


def folder_resolver(field: str = "lora_name") -> Resolver:
    """Resolve names inside ComfyUI's ``loras`` folder (or the CLI's models dir) via ``hidream.model.paths``."""

    def resolve(name: str) -> Path:
        from ..model import paths

        return paths.resolve_model("loras", name, field=field)

    return resolve


def make_lora_spec(
    name: str,
    weight: float,
    stage: str = DEFAULT_STAGE,
    boundary: float = DEFAULT_BOUNDARY,
    resolve: Resolver | None = None,
    merge: str = DEFAULT_MERGE,
) -> LoraSpec:
    """Validate widget values, resolve the file and build a spec (no model work).

    ``resolve(name)`` maps a name to a path inside ComfyUI's ``loras`` folder (``folder_resolver``);
    without one, ``name`` must already be an absolute path (engine use, tests).
    """
    validate_lora(name, weight, stage, boundary)
    validate_merge(merge)
    if resolve is None:
        path = Path(name)
        if not path.is_absolute():
            raise ValueError(
                f"lora_name: {name!r} is not an absolute path and no LoRA folder resolver was given"
            )
    else:
        path = Path(resolve(name))  # the resolver's own errors name the field and what is available
    path = path.resolve()
    if path.suffix.lower() != ".safetensors":
        raise ValueError(
            f"lora_name: {name!r} is not a .safetensors file; only .safetensors LoRAs are loaded"
        )
    if not path.is_file():
        raise ValueError(f"lora_name: {name!r} does not exist ({path})")
    return LoraSpec(
        path=str(path), weight=float(weight), stage=stage, boundary=float(boundary), name=name, merge=merge
    )


_TASK_FIELDS = {"lora_name": "model", "weight": "weight", "stage": "transformer", "boundary": "boundary"}


def lora_spec_from_task(
    entry: Mapping[str, Any] | Any,
    resolve: Resolver | None,
    boundary: float = DEFAULT_BOUNDARY,
    field: str = "lora",
) -> LoraSpec:
    """A Runware task ``lora`` entry (``model``, ``weight`` = 1, ``transformer`` = both) as a spec.

    ``transformer`` is the API's name for the stage. Accepts the raw dict or any object with
    those attributes (``hidream.runware.task.TaskLora``). ``resolve`` None looks the name up in the
    ``loras`` model folder.
    """
    if resolve is None:
        resolve = folder_resolver(f"{field}.model")
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - {"model", "weight", "transformer"})
        if unknown:
            raise ValueError(f"{field}: unknown key(s) {unknown}; allowed: model, weight, transformer")
        model, weight, stage = (
            entry.get("model"),
            entry.get("weight", 1.0),
            entry.get("transformer", DEFAULT_STAGE),
        )
    elif hasattr(entry, "model"):
        model, weight = entry.model, getattr(entry, "weight", 1.0)
        stage = getattr(entry, "transformer", DEFAULT_STAGE)
    else:
        raise TypeError(f"{field}: expected an object {{model, weight, transformer}}, got {entry!r}")
    try:
        return make_lora_spec(model, weight, stage, boundary, resolve=resolve)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        for ours, theirs in _TASK_FIELDS.items():
            if message.startswith(ours + ":"):
                message = f"{field}.{theirs}" + message[len(ours) :]
                break
        raise type(exc)(message) from exc
