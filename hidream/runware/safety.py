"""Content safety check for generated images (Runware ``safety.checkContent`` / ``safety.mode``).

Detector: NudeNet 3.4 (PyPI ``nudenet``), a YOLOv8n detector (``320n.onnx``, 12 MB) that ships
inside the wheel and runs on onnxruntime's CPU provider, so a check needs no download and no
GPU. Its wheel carries the AGPL-3.0 text as its license files (its PyPI metadata still says
MIT; the maintainer says AGPL applies because the model is trained with Ultralytics YOLOv8,
itself AGPL-3.0), and the model has no separate license. So it stays an optional extra
(``pip install nudenet`` or the pack's ``[safety]`` extra): the pack never bundles it and
imports it only when a check runs.

What counts as NSFW: NudeNet's five *exposed* sexual classes (``NSFW_LABELS``). Faces, feet,
armpits, bellies, male chests and every *covered* class are reported by the detector but
never flag an image. An image is flagged when its best NSFW detection scores at least the
threshold (``DEFAULT_THRESHOLD`` 0.4: NudeNet itself drops candidates under 0.2, and a
detection of 0.4 or more is a real hit often enough that masking it is the safer error).

Masking covers the whole image, not the detected boxes: a detector that found one region may
have missed another, and a response must never deliver a flagged image unmasked.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..limits import SAFETY_MASK_METHODS, SAFETY_MODES, SAFETY_THRESHOLD, check_choice, check_number
from .output import to_uint8_images

NSFW_LABELS = frozenset(
    {
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)
DEFAULT_THRESHOLD = 0.4
BLUR_CELLS = 8  # "blur" keeps an 8-cell colour field on the long side: nothing recognisable
INSTALL_HINT = (
    "pip install nudenet (into ComfyUI's Python), or install this pack with its [safety] extra; "
    "NudeNet is AGPL-3.0 and is not bundled"
)


class DetectorNotInstalledError(ImportError):
    """A content check was asked for but NudeNet (or onnxruntime / OpenCV under it) won't import."""


@dataclass(frozen=True)
class SafetyResult:
    """One image's verdict.

    Args:
        flagged: the image must not be delivered unmasked (Runware ``NSFWContent``).
        score: the best NSFW-class detection score, 0.0 when there was none.
        labels: the NSFW classes detected at or above the threshold, sorted.
        reason: a sentence saying why, for logs and responses.
    """

    flagged: bool
    score: float
    labels: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict:
        return {
            "flagged": self.flagged,
            "score": round(self.score, 4),
            "labels": list(self.labels),
            "reason": self.reason,
        }


NOT_CHECKED = SafetyResult(False, 0.0, (), "not checked")


def detector_available() -> bool:
    """True when NudeNet and its runtime import, so a ``fast`` check can run."""
    try:
        import nudenet  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


@functools.lru_cache(maxsize=1)
def load_detector() -> Any:
    """NudeNet's detector on its bundled 320n model, loaded once per process (about 0.3 s).

    Raises ``DetectorNotInstalledError`` saying how to install it: a requested check that
    cannot run is an error, never a silent pass.
    """
    try:
        from nudenet import NudeDetector
    except (ImportError, OSError) as exc:
        raise DetectorNotInstalledError(
            f"safety: content checking (checkContent true / mode 'fast') needs the NudeNet detector, "
            f"which could not be imported ({exc}). Install it: {INSTALL_HINT}."
        ) from exc
    return NudeDetector()


def validate_mode(mode: Any) -> str:
    return check_choice("safety.mode", mode, SAFETY_MODES)


def validate_method(method: Any) -> str:
    return check_choice("mask_method", method, SAFETY_MASK_METHODS)


def validate_threshold(threshold: Any) -> float:
    note = f" (NudeNet returns no detection under {SAFETY_THRESHOLD.lo:g})"
    return check_number("threshold", threshold, SAFETY_THRESHOLD, note)


def _as_uint8_list(images: Any) -> list[np.ndarray]:
    """RGB HxWx3 uint8 arrays from an IMAGE tensor / array, or from a list of HxWxC images."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images: got an empty list; allowed: at least one image")
        out = []
        for i, img in enumerate(images):
            if getattr(img, "ndim", None) != 3:
                raise ValueError(
                    f"images[{i}]: got {type(img).__name__} of shape {getattr(img, 'shape', None)}; "
                    f"expected an HxWxC image"
                )
            out.extend(to_uint8_images(img))
    else:
        out = to_uint8_images(images)
    return [np.ascontiguousarray(img[..., :3]) for img in out]


def classify(detections: Sequence[dict], threshold: float = DEFAULT_THRESHOLD) -> SafetyResult:
    """Turns one image's NudeNet detections (``[{"class", "score", "box"}, ...]``) into a verdict."""
    threshold = validate_threshold(threshold)
    best: dict[str, float] = {}
    for i, det in enumerate(detections):
        label, score = (det.get("class"), det.get("score")) if isinstance(det, dict) else (None, None)
        if not isinstance(label, str) or isinstance(score, bool) or not isinstance(score, (int, float)):
            raise TypeError(
                f"detector output [{i}]: got {det!r}; allowed: a dict with a 'class' string and a 'score'"
            )
        if label in NSFW_LABELS:
            best[label] = max(best.get(label, 0.0), float(score))
    score = max(best.values(), default=0.0)
    hits = sorted(label for label, s in best.items() if s >= threshold)
    if hits:
        found = ", ".join(f"{label} {best[label]:.2f}" for label in sorted(hits, key=lambda k: -best[k]))
        return SafetyResult(True, score, tuple(hits), f"{found} (threshold {threshold:.2f})")
    why = f"highest NSFW score {score:.2f}" if best else "no NSFW detection"
    return SafetyResult(False, score, (), f"{why} (threshold {threshold:.2f})")


def check_images(
    images: Any, mode: str = "fast", threshold: float = DEFAULT_THRESHOLD, detector: Any = None
) -> list[SafetyResult]:
    """One verdict per image.

    ``images``: a ComfyUI IMAGE tensor [B,H,W,C] float 0..1, or a list of HxWx3 uint8 (RGB).
    ``mode``: ``none`` returns ``NOT_CHECKED`` for each image; ``fast`` runs one detector pass
    per image. ``detector``: anything with NudeNet's ``detect(rgb_uint8_array)``; default the
    bundled 320n model. Arrays are handed over in RGB: NudeNet's preprocessing swaps the
    channels twice, so the network sees them as given, which is the order YOLO trains in.
    """
    mode = validate_mode(mode)
    threshold = validate_threshold(threshold)
    arrays = _as_uint8_list(images)
    if mode == "none":
        return [NOT_CHECKED] * len(arrays)
    detector = detector if detector is not None else load_detector()
    return [classify(detector.detect(img), threshold) for img in arrays]


def _blur(image: torch.Tensor) -> torch.Tensor:
    """[H,W,C] -> the same size, averaged down to BLUR_CELLS cells and smoothly scaled back."""
    h, w, _ = image.shape
    scale = BLUR_CELLS / max(h, w)
    cells = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = image.permute(2, 0, 1)[None].float()
    small = F.adaptive_avg_pool2d(x, cells)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)


def _mask_one(image: torch.Tensor, method: str) -> torch.Tensor:
    if method == "black":
        return torch.zeros_like(image)
    return _blur(image).to(image.dtype)


def _mask_array(image: np.ndarray, method: str) -> np.ndarray:
    """Masks one HxWxC numpy image, keeping its dtype (uint8 rounded, floats as computed)."""
    masked = _mask_one(torch.from_numpy(np.ascontiguousarray(image)).float(), method)
    if image.dtype == np.uint8:
        return masked.round().clamp(0, 255).to(torch.uint8).numpy()
    return masked.numpy().astype(image.dtype)


def mask_images(images: Any, results: Sequence[SafetyResult], method: str = "blur") -> Any:
    """Masks every flagged image whole (``blur`` or ``black``); unflagged ones are returned as given.

    A tensor or array [B,H,W,C] comes back as a new one of the same shape and dtype (a tensor on
    its device); a list as a new list whose flagged entries are masked copies and whose other
    entries are the original objects.
    """
    method = validate_method(method)
    if not isinstance(images, (torch.Tensor, np.ndarray, list, tuple)):
        raise TypeError(
            f"images: got {type(images).__name__}; allowed: an IMAGE tensor, an array or a list of arrays"
        )
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim != 4:
        raise ValueError(f"images: got shape {tuple(images.shape)}; allowed: [B, H, W, C]")
    results = list(results)
    if len(results) != len(images):
        raise ValueError(
            f"results: got {len(results)} verdicts for {len(images)} images; allowed: one per image"
        )
    for i, result in enumerate(results):
        if not isinstance(result, SafetyResult):
            raise TypeError(f"results[{i}]: got {type(result).__name__}; allowed: SafetyResult")
    if isinstance(images, torch.Tensor):
        out = images.clone()
        for i, result in enumerate(results):
            if result.flagged:
                out[i] = _mask_one(images[i], method)
        return out
    out_items = images.copy() if isinstance(images, np.ndarray) else list(images)
    for i, result in enumerate(results):
        if result.flagged:
            out_items[i] = _mask_array(np.asarray(images[i]), method)
    return out_items


def check_and_mask(
    images: Any,
    mode: str = "fast",
    method: str = "blur",
    threshold: float = DEFAULT_THRESHOLD,
    detector: Any = None,
) -> tuple[Any, list[SafetyResult]]:
    """The whole safety step: check, then mask what was flagged. All inputs are checked first."""
    validate_method(method)
    results = check_images(images, mode, threshold, detector)
    return mask_images(images, results, method), results


def response_fields(result: SafetyResult) -> dict:
    """Fields for one image's Runware-format response: ``NSFWContent`` plus the pack's reason."""
    return {"NSFWContent": result.flagged, "safetyReason": result.reason}


def report_json(results: Sequence[SafetyResult]) -> str:
    """The node's report: a JSON list, one object per image in batch order."""
    return json.dumps(
        [{"index": i, "NSFWContent": r.flagged, **r.to_dict()} for i, r in enumerate(results)], indent=2
    )
