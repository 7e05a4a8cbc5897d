"""A LoRA session never leaves a trace on the shared transformer.

However a session ends (normally, by an exception, a cancel, an interrupt, a failed load) the base
weights are the very same Parameter objects, bit-identical, with no adapter active and every
PEFT wrapper back in the tree; sessions do not nest; graph branches sharing one transformer get
exactly their separate results; through the sampler, stages switch at the boundary like two
hand-merged copies swapped at that step.
"""

from __future__ import annotations

import copy

import _lora
import pytest
import torch
from _lora import Boom, base_hash, merged, none_active, run, spec, wrappers_in_tree
from hidream_pack.hidream.lora import session as lora
from hidream_pack.hidream.lora import spec as lora_spec
from hidream_pack.hidream.model import tiny
from hidream_pack.hidream.model.handle import HiDreamModel
from hidream_pack.hidream.sampling.progress import Interrupted
from safetensors.torch import save_file

base, files = _lora.base, _lora.files  # the shared fixtures


def _cond():
    return tiny.random_conditioning(9)


def _sample(transformer, loras=(), callback=None) -> torch.Tensor:
    from hidream_pack.hidream.sampling.loop import SampleSettings, sample_latents
    from hidream_pack.hidream.sampling.schedulers import SchedulerSpec

    handle = HiDreamModel(
        transformer=transformer, variant="full", dtype=torch.float32, device=torch.device("cpu")
    )
    for s in loras:
        handle = handle.with_lora(s)
    settings = SampleSettings(width=128, height=128, steps=6, cfg=3.0, seed=4)
    return sample_latents(handle, _cond(), SchedulerSpec("Euler", 3.0), settings, callback=callback).latents


@pytest.mark.parametrize("merge", ["off", "on"])
@pytest.mark.parametrize("error", [None, Boom, Interrupted, KeyboardInterrupt])
def test_session_leaves_base_untouched(tiny_transformer, base, files, error, merge):
    before = base_hash(tiny_transformer)
    weights = {n: p for n, p in base.named_parameters()}
    specs = [spec(files["f1"], 1.0, "high", merge=merge), spec(files["f2"], 1.0, "low", merge=merge)]
    try:
        with lora.LoraSession(base, specs) as s:
            s.on_step(1.0)
            run(base)
            s.on_step(0.2)
            if error is not None:
                raise error("stop mid-sampling")
    except (Boom, Interrupted, KeyboardInterrupt):
        pass
    assert base_hash(base) == before
    assert none_active(base)
    for name, param in base.named_parameters():  # the very same Parameter objects are back
        if ".lora_" not in name:
            assert param is weights[name.replace(".base_layer.", ".")]
    assert torch.equal(run(base), run(tiny_transformer))
    with lora.LoraSession(base, specs):  # a later session opens normally
        pass


def test_nested_session_is_refused(base, files):
    outer = lora.LoraSession(base, [spec(files["f1"])])
    inner = lora.LoraSession(base, [spec(files["f2"])])
    with outer, pytest.raises(RuntimeError, match="already open"), inner:
        pass


def test_load_failure_leaves_session_closed(base, files, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(4, 4)}, str(bad))
    with (
        pytest.raises(ValueError, match="0 of 1 keys"),
        lora.LoraSession(base, [spec(files["f1"]), spec(bad)]),
    ):
        pass
    assert none_active(base)
    with lora.LoraSession(base, [spec(files["f1"])]):
        pass


@pytest.mark.parametrize("merge", ["off", "on"])
def test_two_branches_equal_their_separate_runs(tiny_transformer, base, files, merge):
    root = HiDreamModel(transformer=base, variant="full", dtype=torch.float32, device=torch.device("cpu"))
    a = root.with_lora(spec(files["f1"], 0.9, "high", merge=merge))
    b = root.with_lora(spec(files["f2"], -0.7, "both", merge=merge))
    assert root.loras == () and len(a.loras) == 1 and len(b.loras) == 1

    def sample(handle, transformer, sigmas=(0.95, 0.3)) -> list[torch.Tensor]:
        outs = []
        with lora.LoraSession(transformer, handle.loras) as s:
            for sigma in sigmas:
                s.on_step(sigma)
                outs.append(run(transformer))
        return outs

    alone_a = sample(a, copy.deepcopy(tiny_transformer))
    alone_b = sample(b, copy.deepcopy(tiny_transformer))
    for _ in range(2):  # interleaved on the shared transformer
        for got, want in zip(sample(a, base), alone_a, strict=True):
            assert torch.equal(got, want)
        for got, want in zip(sample(b, base), alone_b, strict=True):
            assert torch.equal(got, want)


def test_sampler_applies_stages_and_restores(tiny_transformer, base, files):
    """high + low through sample_latents equals switching two hand-merged copies at the boundary."""
    from hidream_pack.hidream.sampling.schedulers import SchedulerSpec, make_sampler

    sigmas = [float(x) for x in make_sampler(SchedulerSpec("Euler", 3.0), "full", 6).sigmas[:6]]
    n_high = len(lora_spec.stage_steps(sigmas, "high", 0.9))
    assert 0 < n_high < 6
    before = base_hash(base)
    got = _sample(base, [spec(files["f1"], 1.0, "high", 0.9), spec(files["f2"], -1.0, "low", 0.9)])

    hand = merged(tiny_transformer, [(files["sd1"], 1.0)])
    low = {
        n: p.detach().clone() for n, p in merged(tiny_transformer, [(files["sd2"], -1.0)]).named_parameters()
    }

    def swap(done: int, total: int) -> None:  # before step `done` runs
        if done == n_high:
            with torch.no_grad():
                for n, p in hand.named_parameters():
                    p.copy_(low[n])

    want = _sample(hand, callback=swap)
    assert (got - want).abs().max().item() <= 1e-4
    assert not torch.equal(got, _sample(tiny_transformer))
    assert base_hash(base) == before and none_active(base)
    assert torch.equal(_sample(base), _sample(tiny_transformer))


@pytest.mark.parametrize("error", [Interrupted, Boom])
def test_sampler_cancel_restores(tiny_transformer, base, files, error):
    before = base_hash(base)

    def cancel(done: int, total: int) -> None:
        if done == 3:
            raise error("cancel")

    with pytest.raises(error):
        _sample(
            base, [spec(files["f1"], 1.0, "high", merge="on"), spec(files["f2"], 1.0, "low")], callback=cancel
        )
    assert base_hash(base) == before and none_active(base)
    assert torch.equal(_sample(base), _sample(tiny_transformer))


def test_wrappers_come_back_after_an_error(base, files):
    with pytest.raises(Boom), lora.LoraSession(base, [spec(files["f1"], 1.0, "high")]) as s:
        s.on_step(0.5)
        total = len(s._slots.slots)
        assert total > 0 and wrappers_in_tree(base) == 0
        raise Boom
    assert wrappers_in_tree(base) == total and none_active(base)


def test_interrupted_enter_or_exit_loses_no_wrapper(tiny_transformer, base, files, monkeypatch):
    """Wrappers taken out of the tree are recorded per transformer, so a failure or an interrupt
    while they are out (enter, exit) is repaired by the next session."""
    from hidream_pack.hidream.lora import apply as lora_apply
    from hidream_pack.hidream.model import devices

    want = run(merged(tiny_transformer, [(files["sd1"], 1.0)]))

    def check_next_session_applies() -> None:
        with lora.LoraSession(base, [spec(files["f1"], 1.0, "both", merge="off")]) as s:
            s.on_step(0.5)
            assert (run(base) - want).abs().max() <= 1e-5
            total = len(s._slots.slots)
        assert total > 0 and wrappers_in_tree(base) == total and none_active(base)

    def broken(device):
        raise RuntimeError("CUDA error: device-side assert")

    monkeypatch.setattr(devices, "free_memory", broken)
    with (
        pytest.raises(RuntimeError, match="CUDA error"),
        lora.LoraSession(base, [spec(files["f1"], merge="auto")]),
    ):
        pass
    monkeypatch.undo()
    check_next_session_applies()

    real_install, calls = lora_apply._install, []

    def interrupted(parent, name, module):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_install(parent, name, module)

    with pytest.raises(KeyboardInterrupt), lora.LoraSession(base, [spec(files["f1"], 1.0, "high")]) as s:
        s.on_step(0.5)  # low stage: every wrapper is out of the tree
        monkeypatch.setattr(lora_apply, "_install", interrupted)
    monkeypatch.undo()
    assert len(calls) == 3 and 0 < wrappers_in_tree(base) < len(s._slots.slots)
    check_next_session_applies()
