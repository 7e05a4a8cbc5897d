"""The node contract ComfyUI relies on, for every node of the pack."""

from __future__ import annotations

import inspect

import hidream_pack
import pytest

MAPPINGS = hidream_pack.NODE_CLASS_MAPPINGS
# Core ComfyUI ids and the ids of lum3on's HiDream pack: ours must never collide.
FOREIGN_IDS = {
    "HiDreamSampler",
    "HiDreamSamplerAdvanced",
    "HiDreamImg2Img",
    "KSampler",
    "SaveImage",
    "VAEDecode",
    "QuadrupleCLIPLoader",
    "CLIPTextEncodeHiDream",
    "ModelSamplingSD3",
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def _inputs(cls) -> dict[str, dict]:
    types = cls.INPUT_TYPES()
    assert isinstance(types, dict) and "required" in types, cls
    assert set(types) <= {"required", "optional", "hidden"}, cls
    return types


def test_the_pack_registers_its_nodes():
    expected = {
        "HiDreamI1ModelLoader",
        "HiDreamI1TextEncodersLoader",
        "HiDreamI1VAELoader",
        "HiDreamI1DiffusersLoader",
        "HiDreamI1TextEncode",
        "HiDreamI1Scheduler",
        "HiDreamI1Sampler",
        "HiDreamI1Decode",
        "HiDreamI1LoraLoader",
        "HiDreamI1FirstBlockCache",
        "HiDreamI1TeaCache",
        "HiDreamI1DBCache",
        "HiDreamI1RunwareTask",
        "HiDreamI1SaveImage",
        "HiDreamI1RunRunwareTask",
        "HiDreamI1SafetyCheck",
    }
    assert expected <= set(MAPPINGS)
    assert set(hidream_pack.NODE_DISPLAY_NAME_MAPPINGS) == set(MAPPINGS)


@pytest.mark.parametrize("node_id", sorted(MAPPINGS))
def test_node_metadata(node_id):
    cls = MAPPINGS[node_id]
    assert node_id.startswith("HiDreamI1") and node_id not in FOREIGN_IDS
    assert cls.CATEGORY == "HiDream"
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
    assert hidream_pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("HiDream-I1")


@pytest.mark.parametrize("node_id", sorted(MAPPINGS))
def test_every_input_is_well_formed_with_a_tooltip(node_id):
    types = _inputs(MAPPINGS[node_id])
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (name, spec)
            kind = spec[0]
            # ComfyUI treats only a *list* as a combo; a tuple would be read as a type name.
            assert isinstance(kind, list | str), (name, type(kind))
            if isinstance(kind, list):
                assert all(isinstance(v, str) for v in kind), name
            opts = spec[1] if len(spec) > 1 else {}
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if kind in ("INT", "FLOAT") and "default" in opts:
                assert opts.get("min", float("-inf")) <= opts["default"] <= opts.get("max", float("inf")), (
                    name
                )
            if isinstance(kind, list) and "default" in opts and kind:
                assert opts["default"] in kind, name


@pytest.mark.parametrize("node_id", sorted(MAPPINGS))
def test_function_signature_accepts_exactly_the_inputs(node_id):
    cls = MAPPINGS[node_id]
    types = _inputs(cls)
    fn = getattr(cls, cls.FUNCTION)
    params = dict(inspect.signature(fn).parameters)
    params.pop("self", None)
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    required = set(types["required"])
    optional = set(types.get("optional", {})) | set(types.get("hidden", {}))
    assert required <= set(named) or has_kwargs, required - set(named)
    for name, p in named.items():
        assert name in required | optional, f"{node_id}.{cls.FUNCTION} takes {name!r}, not an input"
        if name not in required:
            assert p.default is not inspect.Parameter.empty, f"optional {name!r} needs a default"


@pytest.mark.parametrize("node_id", sorted(MAPPINGS))
def test_return_declarations_line_up(node_id):
    cls = MAPPINGS[node_id]
    assert isinstance(cls.RETURN_TYPES, tuple)
    n = len(cls.RETURN_TYPES)
    assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == n
    assert len(getattr(cls, "OUTPUT_TOOLTIPS", cls.RETURN_TYPES)) == n
    assert all(isinstance(t, str | list) for t in cls.RETURN_TYPES)


def test_readme_lists_every_node_and_docs_hold_the_current_scheduler_table():
    """The docs stay true: every node's title in the README, the scheduler table as the code builds it."""
    from pathlib import Path

    from hidream_pack.hidream.sampling.schedulers import scheduler_table_markdown

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    for node_id, title in hidream_pack.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert title in readme, f"README does not mention {title} ({node_id})"
    assert scheduler_table_markdown().strip() in (root / "docs" / "schedulers.md").read_text()
