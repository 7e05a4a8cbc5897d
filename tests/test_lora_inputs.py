"""LoRA inputs: bad values and bad files are refused naming the input, the loader node returns a
new handle, and a Runware task's ``lora`` entry becomes the same spec."""

from __future__ import annotations

import os
import pickle
import shutil

import _lora
import pytest
import torch
from _lora import none_active
from hidream_pack.hidream.lora import formats as lora_formats
from hidream_pack.hidream.lora import session as lora
from hidream_pack.hidream.lora import spec as lora_spec
from hidream_pack.hidream.model.handle import HiDreamModel
from hidream_pack.nodes.lora import HiDreamI1LoraLoader

base, files = _lora.base, _lora.files  # the shared fixtures


@pytest.mark.parametrize(
    ("weight", "stage", "boundary", "match"),
    [
        (4.01, "both", 0.875, "weight: got 4.01; allowed: a number from -4 to 4"),
        (-5, "both", 0.875, "weight: got -5; allowed"),
        (float("nan"), "both", 0.875, "weight: got NaN; allowed"),
        ("1", "both", 0.875, 'weight: got "1"; allowed: a number'),
        (True, "both", 0.875, "weight: got true; allowed: a number"),
        (1.0, "mid", 0.875, 'stage: got "mid"; allowed: one of both, high, low'),
        (
            1.0,
            "HIGH",
            0.875,
            "stage: got \"HIGH\"; allowed: one of both, high, low \\(did you mean 'high'\\?\\)",
        ),
        (1.0, "high", 0.0, r"boundary: got 0.0; allowed: a number from 0.001 to 0.999"),
        (1.0, "high", 1.0, r"boundary: got 1.0; allowed: a number from 0.001 to 0.999"),
        (1.0, "low", -0.2, "boundary: got -0.2; allowed"),
        (1.0, "low", None, "boundary: got null; allowed: a number from 0.001 to 0.999"),
    ],
)
def test_bad_values_name_the_input(files, weight, stage, boundary, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lora_spec.make_lora_spec(files["f1"], weight, stage, boundary)
    with pytest.raises((ValueError, TypeError), match=match):
        lora_spec.LoraSpec(path=files["f1"], weight=weight, stage=stage, boundary=boundary)


@pytest.mark.parametrize("value", [True, False, "yes", None, "AUTO"])
def test_bad_merge_mode_names_the_input(files, value):
    with pytest.raises(ValueError, match=r"merge_at_boundary: got .*; allowed: one of auto, on, off"):
        lora_spec.make_lora_spec(files["f1"], 1.0, merge=value)


@pytest.fixture
def models_dir(tmp_path, files, point_models_dir):
    """A models folder with one good LoRA, one garbage file and a booby-trapped pickle
    (overrides conftest's tiny-models folder)."""
    (tmp_path / "loras").mkdir()
    shutil.copyfile(files["f1"], tmp_path / "loras" / "one.safetensors")
    (tmp_path / "loras" / "garbage.safetensors").write_bytes(b"this is not a safetensors header")
    marker = tmp_path / "unpickled"
    with open(tmp_path / "loras" / "evil.ckpt", "wb") as f:  # unpickling it would create `marker`
        pickle.dump(_MakeDir(str(marker)), f)
    return point_models_dir(tmp_path)


class _MakeDir:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_bad_files_name_the_input(models_dir, base):
    resolve = lora_spec.folder_resolver("lora_name")
    with pytest.raises(ValueError, match="lora_name: file 'missing.safetensors' not found in loras/"):
        lora_spec.make_lora_spec("missing.safetensors", 1.0, resolve=resolve)
    with pytest.raises(ValueError, match="lora_name: 'evil.ckpt' is not a .safetensors file"):
        lora_spec.make_lora_spec("evil.ckpt", 1.0, resolve=resolve)
    with pytest.raises(ValueError, match="lora_name: 'evil.ckpt' is not a .safetensors file"):
        lora_formats.read_lora_file(models_dir / "loras" / "evil.ckpt", field="lora_name")
    assert not (models_dir / "unpickled").exists()  # refused unread
    with pytest.raises(ValueError, match="lora_name: 'x' is not an absolute path"):
        lora_spec.make_lora_spec("x", 1.0)
    garbage = lora_spec.make_lora_spec("garbage.safetensors", 1.0, resolve=resolve)
    session = lora.LoraSession(base, [garbage])
    with (
        pytest.raises(ValueError, match="lora_name: 'garbage.safetensors' is not a readable .safetensors"),
        session,
    ):
        pass
    assert none_active(base)


def test_node_returns_new_handle(models_dir, base):
    types = HiDreamI1LoraLoader.INPUT_TYPES()["required"]
    assert all("tooltip" in opts for _, opts in types.values())
    assert types["lora_name"][0] == ["garbage.safetensors", "one.safetensors"]
    assert types["stage"][0] == ["both", "high", "low"]
    assert types["boundary"][1]["default"] == 0.875
    root = HiDreamModel(transformer=base, variant="full", dtype=torch.float32, device=torch.device("cpu"))
    (out,) = HiDreamI1LoraLoader().apply(root, "one.safetensors", 0.5, "low", 0.9)
    (out2,) = HiDreamI1LoraLoader().apply(out, "one.safetensors", 1.0, "high", 0.875)
    assert root.loras == () and len(out.loras) == 1 and len(out2.loras) == 2
    assert out.loras[0] == lora_spec.LoraSpec(
        path=str((models_dir / "loras" / "one.safetensors").resolve()),
        weight=0.5,
        stage="low",
        boundary=0.9,
        name="one.safetensors",
    )
    assert out2.transformer is base
    with pytest.raises(ValueError, match="weight: got 9.0; allowed"):
        HiDreamI1LoraLoader().apply(root, "one.safetensors", 9.0, "low", 0.9)


def test_runware_task_entry(models_dir):
    got = lora_spec.lora_spec_from_task(
        {"model": "one.safetensors", "weight": 0.8, "transformer": "high"}, None
    )
    assert (got.weight, got.stage, got.boundary, got.name) == (0.8, "high", 0.875, "one.safetensors")
    got = lora_spec.lora_spec_from_task({"model": "one.safetensors"}, None)
    assert (got.weight, got.stage) == (1.0, "both")
    with pytest.raises(ValueError, match=r"lora\[1\].weight: got 4.5; allowed"):
        lora_spec.lora_spec_from_task({"model": "one.safetensors", "weight": 4.5}, None, field="lora[1]")
    with pytest.raises(ValueError, match=r'lora\[0\].transformer: got "middle"'):
        lora_spec.lora_spec_from_task(
            {"model": "one.safetensors", "transformer": "middle"}, None, field="lora[0]"
        )
    with pytest.raises(ValueError, match=r"lora\[0\].model: file 'nope.safetensors' not found"):
        lora_spec.lora_spec_from_task({"model": "nope.safetensors"}, None, field="lora[0]")
    with pytest.raises(ValueError, match="unknown key"):
        lora_spec.lora_spec_from_task({"model": "one.safetensors", "strength": 1}, None)
