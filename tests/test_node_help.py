"""Each node's help (web/docs/<node id>.md, shown by the editor) and the Runware save node's rerun rule."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import hidream_pack
import pytest
from hidream_pack.nodes.output import HiDreamI1SaveImage

ROOT = Path(__file__).resolve().parent.parent
NODES = sorted(hidream_pack.NODE_CLASS_MAPPINGS.items())


def test_help_pages_are_what_build_docs_generates():
    result = subprocess.run(
        [sys.executable, str(ROOT / "web" / "build_docs.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.stem for p in (ROOT / "web" / "docs").glob("*.md")) == [node_id for node_id, _ in NODES]


def test_the_editor_is_told_where_the_help_is():
    assert hidream_pack.WEB_DIRECTORY == "./web"
    assert (ROOT / "web" / "docs").is_dir()
    assert not list((ROOT / "web").rglob("*.js")), "a .js file in web/ would be loaded into every editor"


@pytest.mark.parametrize("node_id,cls", NODES, ids=[n for n, _ in NODES])
def test_every_node_says_what_it_does_and_what_each_input_and_output_is(node_id, cls):
    assert len(cls.DESCRIPTION) >= 40, node_id
    spec = cls.INPUT_TYPES()
    page = (ROOT / "web" / "docs" / f"{node_id}.md").read_text()
    assert page.startswith(f"# {cls.TITLE}\n"), node_id
    inputs, outputs = page.split("## Inputs", 1)[1].split("## Outputs", 1)
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            assert len(entry) > 1 and entry[1].get("tooltip"), f"{node_id}.{name}: no tooltip"
            assert inputs.count(f"- **`{name}`** (") == 1, f"{node_id}.{name}: not once in the help page"
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), node_id
    assert all(tip for tip in cls.OUTPUT_TOOLTIPS), node_id
    assert outputs.count("\n- **`") == len(cls.RETURN_TYPES), node_id


@pytest.mark.parametrize("task_uuid", ["", "   ", None])
def test_save_node_runs_again_without_a_task_uuid(task_uuid):
    # NaN equals nothing, so ComfyUI never reuses the last result: a new taskUUID and file each run.
    marker = HiDreamI1SaveImage.IS_CHANGED(task_uuid=task_uuid, filename_prefix="HiDream", seed=-1)
    assert isinstance(marker, float) and math.isnan(marker)


def test_save_node_with_a_task_uuid_is_cached_like_any_node():
    uid = "0f0e7b4c-3d5a-4c3e-9f1a-2b6c8d9e0a1b"
    assert HiDreamI1SaveImage.IS_CHANGED(task_uuid=f" {uid} ", seed=5) == uid
    assert HiDreamI1SaveImage.IS_CHANGED(task_uuid=uid) == HiDreamI1SaveImage.IS_CHANGED(task_uuid=uid)


def _sentinel_inputs() -> set[tuple[str, str]]:
    """(node, input) whose default is a 'not set' value: -1 (and allowed), or a shift of 0."""
    found = set()
    for node_id, cls in NODES:
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, value in spec.get(group, {}).items():
                options = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
                if (
                    options.get("min") == -1
                    and options.get("default") == -1
                    or (name == "shift" and options.get("default") == 0)
                ):
                    found.add((node_id, name))
    return found


def test_every_not_set_value_says_what_it_means_on_the_node():
    """The editor labels widgets from locales/en/nodeDefs.json: '-1' and 'shift 0' name their meaning."""
    import json

    labels = json.loads((ROOT / "locales" / "en" / "nodeDefs.json").read_text())
    named = {(node, name): entry["name"] for node, d in labels.items() for name, entry in d["inputs"].items()}
    sentinels = _sentinel_inputs()
    assert len(sentinels) >= 20
    assert set(named) == sentinels, "a label for an input that is not a sentinel, or a sentinel without one"
    for (node, name), label in named.items():
        default = dict(NODES)[node].INPUT_TYPES()
        value = {**default.get("required", {}), **default.get("optional", {})}[name][1]["default"]
        assert label.startswith(f"{name} (") and f"{value:g} = " in label, (node, name, label)
