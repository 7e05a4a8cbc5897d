"""LoRA sessions on the tiny transformer (CPU, fp32): each LoRA acts in its stage with its weight.

In stage, the output equals the LoRA merged by hand (``_lora.merged``), whether the spec is merged
at the boundary (``merge_at_boundary`` ``on``) or live (``off``); outside its stage the model is
bit-identical to the base (``torch.equal``). Also: exact stage steps for the default schedules, one
adapter per file, reloading a changed file, releasing unused adapters.
"""

from __future__ import annotations

import gc
import os

import _lora
import pytest
import torch
from _lora import flow_sigmas_30, merged, run, spec, write_kohya
from hidream_pack.hidream.lora import formats as lora_formats
from hidream_pack.hidream.lora import session as lora
from hidream_pack.hidream.lora import spec as lora_spec
from peft.tuners.tuners_utils import BaseTunerLayer

base, files = _lora.base, _lora.files  # the shared fixtures


@pytest.mark.parametrize("merge", ["off", "on"])
@pytest.mark.parametrize("weight", [1.0, 0.37, -1.5, 4.0])
def test_in_stage_equals_hand_merge(tiny_transformer, base, files, weight, merge):
    want = run(merged(tiny_transformer, [(files["sd1"], weight)]))
    plain = run(tiny_transformer)
    assert (want - plain).abs().max() > 1e-3  # the LoRA really changes the output
    with lora.LoraSession(base, [spec(files["f1"], weight, "high", merge=merge)]) as session:
        assert session.on_step(0.9) is True
        assert session.merged == ({session._plan[0][0]: weight} if merge == "on" else {})
        got = run(base)
    assert (got - want).abs().max().item() <= 1e-5


def test_merged_and_live_specs_combine(tiny_transformer, base, files):
    """A merged spec and live specs of the same and another file, across the boundary."""
    specs = [
        spec(files["f1"], 0.5, "both", merge="on"),
        spec(files["f1"], 0.25, "high"),
        spec(files["f2"], -1.0, "low", merge="on"),
    ]
    with lora.LoraSession(base, specs) as s:
        a1, a2 = s._plan[0][0], s._plan[2][0]
        s.on_step(0.95)
        assert (s.merged, s.active) == ({a1: 0.5}, {a1: 0.75})
        assert (run(base) - run(merged(tiny_transformer, [(files["sd1"], 0.75)]))).abs().max() <= 1e-5
        assert s.on_step(0.5) is True
        assert (s.merged, s.active) == ({a1: 0.5, a2: -1.0}, {a1: 0.5, a2: -1.0})
        assert (
            run(base) - run(merged(tiny_transformer, [(files["sd1"], 0.5), (files["sd2"], -1.0)]))
        ).abs().max() <= 1e-5
        assert s.on_step(0.4) is False


@pytest.mark.parametrize("merge", ["off", "on"])
def test_outside_stage_is_bit_identical(tiny_transformer, base, files, merge):
    plain = run(tiny_transformer)
    with lora.LoraSession(
        base, [spec(files["f1"], 1.0, "high", merge=merge), spec(files["f2"], 1.0, "low", merge=merge)]
    ) as s:
        assert torch.equal(run(base), plain)  # entered, nothing active yet
        s.on_step(0.95)
        assert s.active == {s._plan[0][0]: 1.0}
        assert not torch.equal(run(base), plain)
        s.on_step(0.875)  # at the boundary: still high
        assert (run(base) - run(merged(tiny_transformer, [(files["sd1"], 1.0)]))).abs().max() <= 1e-5
        s.on_step(0.5)
        assert (run(base) - run(merged(tiny_transformer, [(files["sd2"], 1.0)]))).abs().max() <= 1e-5
    with lora.LoraSession(base, [spec(files["f1"], 2.0, "high", merge=merge)]) as s:
        s.on_step(0.874)
        assert s.active == {}
        assert torch.equal(run(base), plain)


def test_weight_zero_equals_base(tiny_transformer, base, files):
    with lora.LoraSession(base, [spec(files["f1"], 0.0, "both")]) as s:
        assert s.on_step(1.0) is False  # nothing to activate: no change from "none active"
        assert torch.equal(run(base), run(tiny_transformer))


@pytest.mark.parametrize("merge", ["off", "on"])
def test_two_loras_add(tiny_transformer, base, files, merge):
    want = run(merged(tiny_transformer, [(files["sd1"], 0.8), (files["sd2"], -0.6)]))
    with lora.LoraSession(
        base, [spec(files["f1"], 0.8, merge=merge), spec(files["f2"], -0.6, merge=merge)]
    ) as s:
        s.on_step(0.3)
        got = run(base)
    assert (got - want).abs().max().item() <= 1e-5


def test_stage_gating_exact_steps(base, files):
    sigmas = flow_sigmas_30()
    assert lora_spec.stage_steps(sigmas, "high") == list(range(10))
    assert lora_spec.stage_steps(sigmas, "low") == list(range(10, 30))
    assert lora_spec.stage_steps(sigmas, "both") == list(range(30))
    specs = [spec(files["f1"], 0.5, "high"), spec(files["f2"], -1.0, "low")]
    with lora.LoraSession(base, specs) as s:
        high, low = s._plan[0][0], s._plan[1][0]
        seen_high, seen_low, changed = [], [], []
        for i, sigma in enumerate(sigmas):
            if s.on_step(sigma):
                changed.append(i)
            if s.active.get(high) == 0.5:
                seen_high.append(i)
            if s.active.get(low) == -1.0:
                seen_low.append(i)
            assert len(s.active) == 1
    assert seen_high == list(range(10))
    assert seen_low == list(range(10, 30))
    assert changed == [0, 10]


def test_stage_both_every_step_and_boundary_moves_split(base, files):
    sigmas = flow_sigmas_30()
    with lora.LoraSession(base, [spec(files["f1"], 1.0, "both"), spec(files["f2"], 1.0, "high", 0.5)]) as s:
        both, high = s._plan[0][0], s._plan[1][0]
        steps_both, steps_high, changed = [], [], []
        for i, sigma in enumerate(sigmas):
            changed.append(s.on_step(sigma))
            steps_both += [i] if both in s.active else []
            steps_high += [i] if high in s.active else []
    assert steps_both == list(range(30))
    assert steps_high == list(range(23))  # sigma 0.5227 at step 22, 0.4783 at step 23
    assert [i for i, c in enumerate(changed) if c] == [0, 23]


@pytest.mark.parametrize("merge", ["off", "on"])
def test_same_file_in_both_stages_with_different_weights(tiny_transformer, base, files, monkeypatch, merge):
    reads = []
    real = lora_formats.read_lora_file
    monkeypatch.setattr(lora_formats, "read_lora_file", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    specs = [
        spec(files["f1"], 1.5, "high", merge=merge),
        spec(files["f1"], -0.5, "low", merge=merge),
        spec(files["f1"], 0.25, "both", merge=merge),
    ]
    with lora.LoraSession(base, specs) as s:
        assert len(reads) == 1 and len(base.peft_config) == 1  # one adapter per file
        adapter = s._plan[0][0]
        s.on_step(0.9)
        assert s.active == {adapter: 1.75}
        assert (run(base) - run(merged(tiny_transformer, [(files["sd1"], 1.75)]))).abs().max() <= 1e-5
        s.on_step(0.1)
        assert s.active == {adapter: -0.25}
        assert (run(base) - run(merged(tiny_transformer, [(files["sd1"], -0.25)]))).abs().max() <= 1e-5
    with lora.LoraSession(base, specs[:1]):
        pass
    assert len(reads) == 1  # cached across sessions


def test_changed_file_is_reloaded(tiny_transformer, base, files, tmp_path):
    path = tmp_path / "changing.safetensors"
    write_kohya(files["sd1"], path)
    s1 = spec(path, 1.0)
    with lora.LoraSession(base, [s1]) as s:
        first = s._plan[0][0]
    write_kohya(files["sd2"], path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with lora.LoraSession(base, [s1]) as s:
        assert s._plan[0][0] != first
        assert list(base.peft_config) == [s._plan[0][0]]
        s.on_step(0.5)
        assert (run(base) - run(merged(tiny_transformer, [(files["sd2"], 1.0)]))).abs().max() <= 1e-5


def test_unused_adapters_are_released(tiny_transformer, base, files):
    s1, s2 = spec(files["f1"]), spec(files["f2"])
    with lora.LoraSession(base, [s1]):
        pass
    with lora.LoraSession(base, [s2]):
        assert len(base.peft_config) == 2  # s1 is still alive: kept for its branch
    del s1
    gc.collect()
    with lora.LoraSession(base, [s2]) as s:
        assert list(base.peft_config) == [s._plan[0][0]]
        assert set(lora.loaded_adapters(base)) == {files["f2"]}
    del s2, s
    gc.collect()
    lora.release_unused(base)
    assert lora.loaded_adapters(base) == {}
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())  # wrappers removed too
    assert list(base.state_dict()) == list(tiny_transformer.state_dict())
    assert torch.equal(run(base), run(tiny_transformer))
