"""``python . ...`` as a new user meets it: help, refused runs, quiet output, names that match.

Each command runs in a subprocess from an empty working folder, as a user types it, so what
a refused run leaves behind (nothing) and what it prints are what a user would see.
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
from hidream_pack import cli
from hidream_pack.hidream.model import tiny
from hidream_pack.nodes._executor import _SaveImageStandIn

ROOT = Path(__file__).resolve().parent.parent
TASK = {
    "taskType": "imageInference",
    "taskUUID": "c02c8676-a2cb-4b12-8e53-09cc6cd14f84",
    "model": "runware:97@1",
    "positivePrompt": "a lighthouse at dusk",
    "width": 128,
    "height": 128,
    "steps": 2,
    "seed": 7,
}


def python_dot(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "DIFFUSERS_", "HF_HUB_"))
    }
    return subprocess.run(
        [sys.executable, str(ROOT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def _options(parser) -> list:
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return [(name, a) for name, p in subs.choices.items() for a in p._actions if a.option_strings]


def test_every_option_has_help_and_says_its_default():
    for command, action in _options(cli.build_parser()):
        assert action.help, f"{command} {action.option_strings[0]}: no help"
    done = python_dot("run", "--help", cwd=ROOT)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for fragment in (
        "--models-dir MODELS_DIR a folder laid out like ComfyUI's models/ (default: ComfyUI/models when",
        "--output-dir OUTPUT_DIR images go to OUTPUT_DIR/hidream/, made when the first is saved (default: output)",
        "--price-per-hour PRICE_PER_HOUR machine price for includeCost (default: 0.0)",
        "--dtype {bf16,fp16,fp32} compute dtype of the three models (default: bf16)",
        "--verbose also show weight-loading bars",
    ):
        assert fragment in text


@pytest.mark.parametrize(
    ("models_arg", "message"),
    [
        ([], "error: --models-dir: not given, and this pack is not inside ComfyUI/custom_nodes"),
        (["--models-dir", "nowhere"], "error: --models-dir: 'nowhere' ({cwd}/nowhere) is not a folder"),
        (
            ["--models-dir", "empty"],
            "error: model: no file matching *hidream*full* for runware:97@1 (HiDream-I1 Full) in "
            "{cwd}/empty/diffusion_models; found: nothing",
        ),
    ],
)
def test_a_refused_run_names_the_folder_and_writes_nothing(tmp_path, models_arg, message):
    (tmp_path / "task.json").write_text(json.dumps(TASK))
    (tmp_path / "empty").mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = python_dot("run", "task.json", *models_arg, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith(message.format(cwd=tmp_path.resolve())), done.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no output/


def test_an_unwritable_output_folder_is_refused_first(tmp_path):
    (tmp_path / "task.json").write_text(json.dumps(TASK))
    (tmp_path / "a-file").write_text("")
    done = python_dot("run", "task.json", "--models-dir", ".", "--output-dir", "a-file/out", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: --output-dir: 'a-file/out' cannot hold images ({tmp_path / 'a-file'} is not a folder); "
        "expected a writable folder"
    )


def test_a_run_is_quiet_unless_verbose(tiny_paths, tmp_path):
    """The JSON line and the pack's own report; weight bars and tokenizer notices only with --verbose."""
    (tmp_path / "task.json").write_text(json.dumps(TASK))
    models = str(tiny_paths["models_dir"])
    quiet = python_dot("run", "task.json", "--models-dir", models, "--dtype", "fp32", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert [json.loads(line)["taskUUID"] for line in quiet.stdout.splitlines()] == [TASK["taskUUID"]]
    assert [line.split(":", 1)[0] for line in quiet.stderr.splitlines()] == ["INFO hidream_pack.cli"]
    loud = python_dot(
        "run", "task.json", "--verbose", "--models-dir", models, "--dtype", "fp32", cwd=tmp_path
    )
    assert loud.returncode == 0, loud.stderr
    assert "Loading weights" in loud.stderr
    assert len(list((tmp_path / "output" / "hidream").glob("HiDream_*.jpg"))) == 2


def test_tiny_models_carry_the_names_the_shipped_workflows_load(tiny_paths):
    """Every model file a shipped workflow names is one that ``tiny-models`` writes."""
    root = tiny_paths["models_dir"]
    written = {p.name for p in root.rglob("*")}
    named = set()
    for path in (ROOT / "workflows").glob("*.json"):
        for node in json.loads(path.read_text())["nodes"]:
            named |= {
                v
                for v in node.get("widgets_values") or []
                if isinstance(v, str) and v.endswith(".safetensors")
            }
            named |= {
                v
                for v in node.get("widgets_values") or []
                if isinstance(v, str) and v.startswith("HiDream-I1-")
            }
    assert named and named <= written, f"named by a workflow, not written: {sorted(named - written)}"


def test_tiny_models_never_replace_a_users_file(tmp_path):
    real = tmp_path / "diffusion_models" / "hidream_i1_full_fp8.safetensors"
    real.parent.mkdir()
    real.write_bytes(b"a user's 17B model")
    with pytest.raises(
        ValueError,
        match=r"already holds diffusion_models/hidream_i1_full_fp8\.safetensors, not written by tiny-models",
    ):
        tiny.write_tiny_models(tmp_path)
    assert real.read_bytes() == b"a user's 17B model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusion_models"]  # refused before writing


def test_saved_images_never_overwrite_earlier_ones(tmp_path):
    """A demo rerun (or a second SaveImage) numbers on after the files already there, as ComfyUI does."""
    save = _SaveImageStandIn(tmp_path)
    images = torch.rand(2, 8, 8, 3)
    (tmp_path / "hidream_i1_full_00003_.png").write_bytes(b"earlier")
    first = save.save(images, "hidream_i1_full")["ui"]["images"]
    second = save.save(images[:1], "hidream_i1_full")["ui"]["images"]
    assert [Path(p).name for p in first + second] == [
        "hidream_i1_full_00004_.png",
        "hidream_i1_full_00005_.png",
        "hidream_i1_full_00006_.png",
    ]
    assert (tmp_path / "hidream_i1_full_00003_.png").read_bytes() == b"earlier"
    from PIL import Image

    with Image.open(first[0]) as png:
        assert np.array_equal(
            np.asarray(png), np.clip(images[0].numpy() * 255 + 0.5, 0, 255).astype(np.uint8)
        )


def test_a_private_webhook_is_refused_before_anything_loads(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "task.json").write_text(
        json.dumps({**TASK, "deliveryMethod": "async", "webhookURL": "http://10.0.0.5/hook"})
    )
    done = python_dot("run", "task.json", "--models-dir", "models", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: webhookURL: http://10.0.0.5/hook is refused: 10.0.0.5 is a private address (allow it with "
        "allowTargets / HIDREAM_ALLOW_TARGETS); allowed: public addresses"
    )
    assert not (tmp_path / "output").exists()
    bad = python_dot(
        "run", "task.json", "--models-dir", "models", "--allow-target", "not a host!", cwd=tmp_path
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: --allow-target/--deny-target (allow): got 'not a host!'")
