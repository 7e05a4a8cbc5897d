"""``merge_at_boundary``: how merged LoRA specs reach the weights, and idle PEFT wrappers.

``auto`` (the default) merges into a copy of the patched weights when one fits in free memory,
else per call, one layer at a time; both give the hand merge's output. A merge that fails half
way restores the weights already swapped. A step with nothing live runs the plain base Linears.
"""

from __future__ import annotations

import _lora
import pytest
import torch
from _lora import merged, none_active, run, spec, wrappers_in_tree
from hidream_pack.hidream.lora import session as lora
from hidream_pack.hidream.lora import spec as lora_spec

base, files = _lora.base, _lora.files  # the shared fixtures


def test_auto_merges_when_a_copy_fits(tiny_transformer, base, files):
    assert lora_spec.LoraSpec(path=files["f1"], weight=1.0, stage="both").merge == "auto"  # the default
    with lora.LoraSession(base, [spec(files["f1"], 0.8, "high", merge="auto")]) as s:
        s.on_step(0.95)
        assert s.merged == {s._plan[0][0]: 0.8}
        assert wrappers_in_tree(base) == 0  # merged and nothing live: plain modules only
        assert (run(base) - run(merged(tiny_transformer, [(files["sd1"], 0.8)]))).abs().max() <= 1e-5
    assert wrappers_in_tree(base) > 0 and none_active(base)


def test_auto_merges_per_call_without_room(tiny_transformer, base, files, monkeypatch, caplog):
    from hidream_pack.hidream.lora import apply as lora_apply
    from hidream_pack.hidream.model import devices

    with lora.LoraSession(base, [spec(files["f1"])]) as s:
        layers = lora_apply.touched(s._slots.layers, [s._plan[0][0]])
        need = sum(layer.get_base_layer().weight.numel() * 4 for layer in layers)
    assert need > 0
    weights = {n.replace(".base_layer.", "."): p for n, p in base.named_parameters() if ".lora_" not in n}
    monkeypatch.setattr(devices, "free_memory", lambda device: need + lora_apply.MERGE_RESERVE_BYTES - 1)
    specs = [spec(files["f1"], 0.8, "high", merge="auto"), spec(files["f2"], 0.5, "high", merge="auto")]
    with caplog.at_level("INFO"), lora.LoraSession(base, specs) as s:
        s.on_step(0.95)
        a1, a2 = s._plan[0][0], s._plan[1][0]
        assert (s.merged, s.active) == ({a1: 0.8, a2: 0.5}, {a1: 0.8, a2: 0.5})
        for name, param in base.named_parameters():  # no copy: the original weights compute
            assert param is weights[name]
        per_call = run(base)
        want = merged(tiny_transformer, [(files["sd1"], 0.8), (files["sd2"], 0.5)])
        assert (per_call - run(want)).abs().max() <= 1e-5
        s.on_step(0.5)
        assert torch.equal(run(base), run(tiny_transformer))
    assert "merge_at_boundary auto: merged per call (a merged copy needs" in caplog.text
    assert none_active(base) and all("forward" not in m.__dict__ for m in base.modules())
    monkeypatch.setattr(devices, "free_memory", lambda device: need + lora_apply.MERGE_RESERVE_BYTES)
    with lora.LoraSession(base, specs) as s:
        s.on_step(0.95)
        assert not all(param is weights[name] for name, param in base.named_parameters())  # a copy
        assert torch.equal(run(base), per_call)  # the same arithmetic either way
    monkeypatch.setattr(devices, "free_memory", lambda device: None)
    with lora.LoraSession(base, specs[:1]) as s:
        assert s._auto_merge == lora_apply.PER_CALL
        mixed = [specs[0], spec(files["f2"], 0.5, "high", merge="on")]  # on: a copy regardless
    with lora.LoraSession(base, mixed) as s:
        s.on_step(0.95)
        assert s._merging == [lora_apply.PER_CALL, lora_apply.COPY]
        assert not all(param is weights[name] for name, param in base.named_parameters())
        assert any("forward" in m.__dict__ for m in base.modules())
        assert (run(base) - run(want)).abs().max() <= 1e-5  # the per-call delta adds onto the copy
    assert all("forward" not in m.__dict__ for m in base.modules())


def test_idle_wrappers_leave_the_forward_path(tiny_transformer, base, files):
    """A step with nothing live runs the base Linears themselves; live steps put wrappers back."""
    plain_linears = {n: m for n, m in tiny_transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    with lora.LoraSession(base, [spec(files["f1"], 1.0, "high")]) as s:
        total = len(s._slots.slots)
        assert total > 0 and wrappers_in_tree(base) == 0  # entered: nothing acts yet
        s.on_step(0.95)
        assert wrappers_in_tree(base) == total
        s.on_step(0.5)  # low stage: nothing live
        assert wrappers_in_tree(base) == 0
        assert {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)} == set(plain_linears)
        assert torch.equal(run(base), run(tiny_transformer))
        s.on_step(0.95)
        assert wrappers_in_tree(base) == total
    assert wrappers_in_tree(base) == total and none_active(base)


def test_merge_failure_half_way_restores(tiny_transformer, base, files, monkeypatch):
    """Out of memory (say) while merging the 5th layer: the 4 already swapped are restored."""
    real, calls = torch.addmm, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    weights = dict(base.named_parameters())
    with (
        pytest.raises(RuntimeError, match="out of memory"),
        lora.LoraSession(base, [spec(files["f1"], merge="on")]) as s,
    ):
        monkeypatch.setattr(torch, "addmm", flaky)
        s.on_step(0.5)
    monkeypatch.undo()
    assert len(calls) == 5
    for name, param in base.named_parameters():
        if ".lora_" not in name:
            assert param is weights[name.replace(".base_layer.", ".")]
    assert none_active(base) and torch.equal(run(base), run(tiny_transformer))


def test_free_memory_reads_the_os(monkeypatch):
    import sys

    from hidream_pack.hidream.model import devices

    with_psutil = devices.free_memory("cpu")
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    from_proc = devices.free_memory("cpu")
    assert with_psutil > 0 and from_proc > 0
    assert abs(with_psutil - from_proc) < 0.25 * with_psutil  # same quantity, two readers
    assert devices.free_memory("meta") is None
