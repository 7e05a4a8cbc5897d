"""Content safety check: verdicts, masking, the node, and the error when NudeNet is missing.

The flagged path is driven by detector results the tests construct (in NudeNet's own output
format), through a stub detector or ``classify``: no image a test can generate makes the real
320n model report exposed nudity. The real model is run on synthetic images, which must pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hidream_pack.hidream.runware import safety
from hidream_pack.hidream.runware.safety import SafetyResult
from hidream_pack.nodes.safety import HiDreamI1SafetyCheck

PACK_ROOT = Path(__file__).resolve().parent.parent
NO_HIT = SafetyResult(False, 0.0, (), "no NSFW detection (threshold 0.40)")


class StubDetector:
    """Answers ``detect`` from a fixed list of NudeNet-format detection lists and records its inputs."""

    def __init__(self, answers: list[list[dict]]):
        self.answers = list(answers)
        self.seen: list[np.ndarray] = []

    def detect(self, image: np.ndarray) -> list[dict]:
        self.seen.append(image.copy())
        return self.answers[len(self.seen) - 1]


class ExplodingDetector:
    def detect(self, image):
        raise AssertionError("the detector must not run")


def _det(label: str, score: float) -> dict:
    return {"class": label, "score": score, "box": [10, 20, 30, 40]}


def _synthetic_batch(size: int = 256) -> torch.Tensor:
    """Gradient, seeded noise, solid mid-grey: [3, size, size, 3] float 0..1."""
    ramp = torch.linspace(0, 1, size)
    gradient = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size)] * 2)[:3]
    noise = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(0))
    grey = torch.full((size, size, 3), 0.5)
    return torch.stack([gradient.permute(1, 2, 0), noise, grey])


def _checkerboard(size: int = 256) -> torch.Tensor:
    idx = torch.arange(size)
    board = ((idx[:, None] + idx[None, :]) % 2).float()
    return board[..., None].expand(size, size, 3).contiguous()


# --- verdicts from detections -------------------------------------------------------------------


def test_classify_flags_only_exposed_sexual_classes_at_or_above_the_threshold():
    detections = [
        _det("FACE_FEMALE", 0.97),
        _det("BELLY_EXPOSED", 0.9),
        _det("MALE_BREAST_EXPOSED", 0.9),
        _det("FEMALE_BREAST_COVERED", 0.9),
        _det("BUTTOCKS_EXPOSED", 0.4),  # exactly the threshold: flags
        _det("FEMALE_BREAST_EXPOSED", 0.61),
        _det("FEMALE_BREAST_EXPOSED", 0.83),  # two boxes: the best counts
        _det("ANUS_EXPOSED", 0.25),  # NSFW but under the threshold
    ]
    assert safety.classify(detections, 0.4) == SafetyResult(
        True,
        0.83,
        ("BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED"),
        "FEMALE_BREAST_EXPOSED 0.83, BUTTOCKS_EXPOSED 0.40 (threshold 0.40)",
    )


def test_classify_unflagged_reports_the_best_nsfw_score_or_none():
    assert safety.classify([_det("ANUS_EXPOSED", 0.39), _det("FACE_MALE", 0.9)], 0.4) == SafetyResult(
        False, 0.39, (), "highest NSFW score 0.39 (threshold 0.40)"
    )
    assert safety.classify([_det("FEET_EXPOSED", 0.99)], 0.5) == SafetyResult(
        False, 0.0, (), "no NSFW detection (threshold 0.50)"
    )
    assert safety.classify([]) == NO_HIT


def test_nsfw_label_set_is_exactly_the_five_exposed_sexual_classes():
    assert sorted(safety.NSFW_LABELS) == [
        "ANUS_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
    ]


@pytest.mark.parametrize("bad", [[{"class": "ANUS_EXPOSED"}], [("ANUS_EXPOSED", 0.9)], [{"score": 0.9}]])
def test_classify_rejects_malformed_detector_output(bad):
    with pytest.raises(TypeError, match=r"detector output \[0\]"):
        safety.classify(bad)


# --- check_images -------------------------------------------------------------------------------


def test_check_images_hands_the_detector_rgb_uint8_as_saveimage_would_write_it():
    image = torch.zeros(1, 4, 6, 3)
    image[..., 0] = 1.0
    image[..., 1] = 0.5  # 127.5 truncates to 127, as ComfyUI's SaveImage does
    stub = StubDetector([[]])
    assert safety.check_images(image, "fast", detector=stub) == [NO_HIT]
    (seen,) = stub.seen
    assert seen.dtype == np.uint8 and seen.shape == (4, 6, 3)
    assert seen.reshape(-1, 3).tolist() == [[255, 127, 0]] * 24


def test_check_images_accepts_a_list_of_uint8_images_of_different_sizes():
    images = [np.full((8, 12, 3), 7, np.uint8), np.full((5, 5, 4), 9, np.uint8)]
    stub = StubDetector([[_det("MALE_GENITALIA_EXPOSED", 0.7)], []])
    results = safety.check_images(images, detector=stub)
    assert results == [
        SafetyResult(True, 0.7, ("MALE_GENITALIA_EXPOSED",), "MALE_GENITALIA_EXPOSED 0.70 (threshold 0.40)"),
        NO_HIT,
    ]
    assert [a.shape for a in stub.seen] == [(8, 12, 3), (5, 5, 3)]  # alpha dropped


def test_mode_none_checks_nothing_and_passes_images_through():
    images = _synthetic_batch(16)
    assert safety.check_images(images, "none", detector=ExplodingDetector()) == [safety.NOT_CHECKED] * 3
    out, results = safety.check_and_mask(images, "none", "black", detector=ExplodingDetector())
    assert results == [SafetyResult(False, 0.0, (), "not checked")] * 3
    assert torch.equal(out, images)


@pytest.mark.parametrize("mode", ["slow", "Fast", "", None, True])
def test_unknown_mode_is_rejected_before_any_detection(mode):
    with pytest.raises(ValueError, match=r"safety\.mode: got .*; allowed: one of none, fast"):
        safety.check_images(_synthetic_batch(8), mode, detector=ExplodingDetector())


@pytest.mark.parametrize(
    ("threshold", "error"),
    [
        (0.1, ValueError),
        (1.01, ValueError),
        (float("nan"), ValueError),
        (True, TypeError),
        ("0.5", TypeError),
    ],
)
def test_threshold_outside_its_range_is_rejected(threshold, error):
    with pytest.raises(error, match=r"threshold: got .*; allowed: a number from 0\.2 to 1"):
        safety.check_images(_synthetic_batch(8), "fast", threshold, detector=ExplodingDetector())


def test_bad_images_are_rejected():
    with pytest.raises(ValueError, match=r"images: got an empty list"):
        safety.check_images([], detector=ExplodingDetector())
    with pytest.raises(ValueError, match=r"images\[1\]"):
        safety.check_images([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)])
    with pytest.raises(ValueError, match=r"images: got shape \(2, 3\)"):
        safety.check_images(torch.zeros(2, 3), detector=ExplodingDetector())


# --- masking ------------------------------------------------------------------------------------


def test_blur_masks_a_flagged_image_whole_and_leaves_the_others_bit_identical():
    images = torch.stack([_checkerboard(), _synthetic_batch()[1]])
    results = [SafetyResult(True, 0.9, ("ANUS_EXPOSED",), "x"), NO_HIT]
    out = safety.mask_images(images, results, "blur")
    assert out.shape == images.shape and out.dtype == images.dtype
    # 1-pixel checkerboard averaged over 32x32 cells: exactly 0.5 everywhere, nothing of it left.
    assert torch.equal(out[0], torch.full_like(images[0], 0.5))
    assert torch.equal(out[1], images[1])
    assert torch.equal(images[0], _checkerboard())  # input untouched


def test_blur_keeps_only_a_coarse_colour_field():
    noise = _synthetic_batch()[1:2]
    out = safety.mask_images(noise, [SafetyResult(True, 0.5, ("ANUS_EXPOSED",), "x")], "blur")
    assert not torch.equal(out, noise)
    # neighbouring pixels differ by far less than in the noise: the detail is gone
    assert (out[0, 1:] - out[0, :-1]).abs().max() < 0.01 < (noise[0, 1:] - noise[0, :-1]).abs().max()
    assert abs(out.mean().item() - noise.mean().item()) < 1e-3


def test_black_sets_flagged_images_to_zero():
    images = _synthetic_batch(32)
    flagged = SafetyResult(True, 0.5, ("ANUS_EXPOSED",), "x")
    out = safety.mask_images(images, [flagged, NO_HIT, flagged], "black")
    zeros = torch.zeros_like(images[0])
    assert torch.equal(out[0], zeros) and torch.equal(out[2], zeros)
    assert torch.equal(out[1], images[1])


def test_list_masking_returns_uint8_for_flagged_and_the_same_objects_otherwise():
    board = (_checkerboard(64).numpy() * 255).astype(np.uint8)
    other = np.full((10, 10, 3), 200, np.uint8)
    out = safety.mask_images(
        [board, other], [SafetyResult(True, 0.5, ("ANUS_EXPOSED",), "x"), NO_HIT], "blur"
    )
    assert out[1] is other
    assert out[0].dtype == np.uint8 and out[0].shape == board.shape
    assert np.unique(out[0]).tolist() == [128]  # 127.5 rounded


def test_mask_rejects_mismatched_results_and_unknown_methods():
    images = _synthetic_batch(8)
    with pytest.raises(ValueError, match=r"results: got 2 verdicts for 3 images"):
        safety.mask_images(images, [NO_HIT, NO_HIT], "blur")
    with pytest.raises(ValueError, match=r'mask_method: got "pixelate"; allowed: one of blur, black'):
        safety.mask_images(images, [NO_HIT] * 3, "pixelate")
    with pytest.raises(TypeError, match=r"results\[0\]"):
        safety.mask_images(images, [{"flagged": True}] * 3, "blur")


def test_check_and_mask_validates_the_method_before_detecting():
    with pytest.raises(ValueError, match=r"mask_method"):
        safety.check_and_mask(_synthetic_batch(8), "fast", "none", detector=ExplodingDetector())


# --- responses and the node ---------------------------------------------------------------------


def test_response_fields_and_report():
    hit = safety.classify([_det("FEMALE_GENITALIA_EXPOSED", 0.912345)])
    assert safety.response_fields(hit) == {
        "NSFWContent": True,
        "safetyReason": "FEMALE_GENITALIA_EXPOSED 0.91 (threshold 0.40)",
    }
    assert safety.response_fields(safety.NOT_CHECKED) == {"NSFWContent": False, "safetyReason": "not checked"}
    assert json.loads(safety.report_json([NO_HIT, hit])) == [
        {
            "index": 0,
            "NSFWContent": False,
            "flagged": False,
            "score": 0.0,
            "labels": [],
            "reason": NO_HIT.reason,
        },
        {
            "index": 1,
            "NSFWContent": True,
            "flagged": True,
            "score": 0.9123,
            "labels": ["FEMALE_GENITALIA_EXPOSED"],
            "reason": "FEMALE_GENITALIA_EXPOSED 0.91 (threshold 0.40)",
        },
    ]


def test_node_masks_what_the_detector_flags(monkeypatch):
    stub = StubDetector([[_det("FACE_FEMALE", 0.9)], [_det("BUTTOCKS_EXPOSED", 0.55)], []])
    monkeypatch.setattr(safety, "load_detector", lambda: stub)
    images = _synthetic_batch(32)
    out, report = HiDreamI1SafetyCheck().check(images, "fast", "black", 0.5)
    assert torch.equal(out[0], images[0]) and torch.equal(out[2], images[2])
    assert torch.equal(out[1], torch.zeros_like(images[1]))
    assert [(r["index"], r["flagged"], r["labels"]) for r in json.loads(report)] == [
        (0, False, []),
        (1, True, ["BUTTOCKS_EXPOSED"]),
        (2, False, []),
    ]


def test_node_mode_none_returns_the_images_unchanged():
    images = _synthetic_batch(16)
    out, report = HiDreamI1SafetyCheck().check(images, "none", "blur", 0.4)
    assert torch.equal(out, images)
    assert [r["reason"] for r in json.loads(report)] == ["not checked"] * 3


def test_node_widgets_match_the_engine():
    required = HiDreamI1SafetyCheck.INPUT_TYPES()["required"]
    assert required["mode"][0] == ["fast", "none"]
    assert required["mask_method"][0] == ["blur", "black"]
    assert (required["threshold"][1]["min"], required["threshold"][1]["max"]) == (0.2, 1.0)
    assert required["threshold"][1]["default"] == 0.4


# --- the real detector --------------------------------------------------------------------------


def test_real_detector_passes_synthetic_images():
    pytest.importorskip("nudenet", reason="the optional NudeNet detector is not installed")
    assert safety.detector_available() is True
    images = _synthetic_batch()
    detector = safety.load_detector()
    raw = [detector.detect(img) for img in safety._as_uint8_list(images)]
    assert raw == [[], [], []]
    out, results = safety.check_and_mask(images, "fast", "blur")
    assert results == [NO_HIT] * 3
    assert torch.equal(out, images)


_MISSING_SCRIPT = """
import sys, types
sys.modules["nudenet"] = None  # "import nudenet" now raises ImportError, as when it is absent
pack = types.ModuleType("hidream_pack")
pack.__path__ = [sys.argv[1]]
sys.modules["hidream_pack"] = pack
import numpy as np
from hidream_pack.hidream.runware import safety
image = [np.zeros((8, 8, 3), np.uint8)]
assert safety.detector_available() is False
assert safety.check_images(image, "none") == [safety.NOT_CHECKED]
try:
    safety.check_images(image, "fast")
except safety.DetectorNotInstalledError as exc:
    assert isinstance(exc, ImportError)
    print("ERROR:", exc)
else:
    print("NO ERROR")
"""


def test_missing_detector_is_a_clear_error_never_a_silent_pass():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _MISSING_SCRIPT, str(PACK_ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(
        "ERROR: safety: content checking (checkContent true / mode 'fast') needs the NudeNet"
    )
    assert "pip install nudenet" in line and "[safety] extra" in line
