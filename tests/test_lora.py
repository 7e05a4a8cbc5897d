"""LoRA with stage targeting on a tiny HiDream transformer (CPU, fp32).

Reference for every numeric check: the LoRA merged by hand into a copy of the base weights,
``W + weight * (alpha / rank) * B @ A``. Outside its stage, and after any session, the model
must be bit-identical to the base (``torch.equal``), because adapters are switched, never merged.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import os
import pickle
import shutil

import pytest
import torch
from diffusers import HiDreamImageTransformer2DModel, UniPCMultistepScheduler
from hidream_pack.hidream.lora import formats as lora_formats
from hidream_pack.hidream.lora import session as lora
from hidream_pack.hidream.lora import spec as lora_spec
from hidream_pack.hidream.model import paths, tiny
from hidream_pack.hidream.model.handle import HiDreamModel
from hidream_pack.hidream.sampling.progress import Interrupted
from hidream_pack.nodes.lora import HiDreamI1LoraLoader
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

TINY = tiny.TINY_TRANSFORMER_CONFIG
TARGETS = r".*\.(to_q|to_k|to_v|to_out|to_q_t|to_k_t|to_v_t|to_out_t|w1|w2|w3)$"
RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2


@pytest.fixture(scope="module")
def pristine() -> HiDreamImageTransformer2DModel:
    torch.manual_seed(0)
    return HiDreamImageTransformer2DModel(**TINY).eval()


@pytest.fixture
def base(pristine) -> HiDreamImageTransformer2DModel:
    """A fresh copy per test, so adapter caches never leak between tests."""
    return copy.deepcopy(pristine)


def make_lora(pristine, seed: int, targets: str = TARGETS) -> dict[str, torch.Tensor]:
    """A peft LoRA on the tiny model (rank 4), with random nonzero B; peft keys, no prefix."""
    torch.manual_seed(seed)
    model = copy.deepcopy(pristine)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets), model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def write_kohya(sd: dict[str, torch.Tensor], path) -> str:
    """kohya layout with alpha: what most HiDream LoRAs in the wild look like."""
    out = {}
    for key, value in sd.items():
        module, factor = key.rsplit(".lora_", 1)
        flat = "lora_unet_" + module.replace(".", "_")
        out[f"{flat}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = value
        out[f"{flat}.alpha"] = torch.tensor(ALPHA)
    save_file(out, str(path))
    return str(path)


def merged(pristine, loras: list[tuple[dict[str, torch.Tensor], float]]) -> torch.nn.Module:
    """Hand merge: W + weight * (alpha / rank) * B @ A for each (lora, weight)."""
    model = copy.deepcopy(pristine)
    with torch.no_grad():
        for sd, weight in loras:
            for key, a in sd.items():
                if key.endswith(".lora_A.weight"):
                    module = key[: -len(".lora_A.weight")]
                    b = sd[f"{module}.lora_B.weight"]
                    model.get_submodule(module).weight += weight * (ALPHA / RANK) * (b @ a)
    return model


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 8, 8, generator=g),
        timesteps=torch.tensor([700.0]),
        encoder_hidden_states_t5=torch.randn(1, 8, 32, generator=g),
        encoder_hidden_states_llama3=torch.randn(4, 1, 8, 32, generator=g),
        pooled_embeds=torch.randn(1, 32, generator=g),
    )


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(), return_dict=False)[0]


def base_hash(model) -> str:
    """Hash of the base weights, named as in the plain model (peft's base_layer hop removed)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".lora_" in name:
            continue
        h.update(name.replace(".base_layer.", ".").encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def none_active(model) -> bool:
    return all(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))


def spec(
    path: str, weight: float = 1.0, stage: str = "both", boundary: float = 0.875, merge: str = "off"
) -> lora_spec.LoraSpec:
    return lora_spec.LoraSpec(path=str(path), weight=weight, stage=stage, boundary=boundary, merge=merge)


@pytest.fixture(scope="module")
def files(pristine, tmp_path_factory):
    """Two LoRAs (different seeds) as kohya files, plus their peft state dicts."""
    d = tmp_path_factory.mktemp("loras")
    sd1, sd2 = make_lora(pristine, 11), make_lora(pristine, 22)
    return {
        "sd1": sd1,
        "sd2": sd2,
        "f1": write_kohya(sd1, d / "one.safetensors"),
        "f2": write_kohya(sd2, d / "two.safetensors"),
    }


def flow_sigmas_30() -> list[float]:
    """The Full default scheduler's 30 step sigmas (UniPC flow sigmas, shift 3.0)."""
    sched = UniPCMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    sched.set_timesteps(30)
    return [float(s) for s in sched.sigmas[:-1]]


# --- numerics -------------------------------------------------------------------------------


@pytest.mark.parametrize("merge", ["off", "on"])
@pytest.mark.parametrize("weight", [1.0, 0.37, -1.5, 4.0])
def test_in_stage_equals_hand_merge(pristine, base, files, weight, merge):
    want = run(merged(pristine, [(files["sd1"], weight)]))
    plain = run(pristine)
    assert (want - plain).abs().max() > 1e-3  # the LoRA really changes the output
    with lora.LoraSession(base, [spec(files["f1"], weight, "high", merge=merge)]) as session:
        assert session.on_step(0.9) is True
        assert session.merged == ({session._plan[0][0]: weight} if merge == "on" else {})
        got = run(base)
    assert (got - want).abs().max().item() <= 1e-5


def test_merged_and_live_specs_combine(pristine, base, files):
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
        assert (run(base) - run(merged(pristine, [(files["sd1"], 0.75)]))).abs().max() <= 1e-5
        assert s.on_step(0.5) is True
        assert (s.merged, s.active) == ({a1: 0.5, a2: -1.0}, {a1: 0.5, a2: -1.0})
        assert (
            run(base) - run(merged(pristine, [(files["sd1"], 0.5), (files["sd2"], -1.0)]))
        ).abs().max() <= 1e-5
        assert s.on_step(0.4) is False


@pytest.mark.parametrize("merge", ["off", "on"])
def test_outside_stage_is_bit_identical(pristine, base, files, merge):
    plain = run(pristine)
    with lora.LoraSession(
        base, [spec(files["f1"], 1.0, "high", merge=merge), spec(files["f2"], 1.0, "low", merge=merge)]
    ) as s:
        assert torch.equal(run(base), plain)  # entered, nothing active yet
        s.on_step(0.95)
        assert s.active == {s._plan[0][0]: 1.0}
        assert not torch.equal(run(base), plain)
        s.on_step(0.875)  # at the boundary: still high
        assert (run(base) - run(merged(pristine, [(files["sd1"], 1.0)]))).abs().max() <= 1e-5
        s.on_step(0.5)
        assert (run(base) - run(merged(pristine, [(files["sd2"], 1.0)]))).abs().max() <= 1e-5
    with lora.LoraSession(base, [spec(files["f1"], 2.0, "high", merge=merge)]) as s:
        s.on_step(0.874)
        assert s.active == {}
        assert torch.equal(run(base), plain)


def test_weight_zero_equals_base(pristine, base, files):
    with lora.LoraSession(base, [spec(files["f1"], 0.0, "both")]) as s:
        assert s.on_step(1.0) is False  # nothing to activate: no change from "none active"
        assert torch.equal(run(base), run(pristine))


@pytest.mark.parametrize("merge", ["off", "on"])
def test_two_loras_add(pristine, base, files, merge):
    want = run(merged(pristine, [(files["sd1"], 0.8), (files["sd2"], -0.6)]))
    with lora.LoraSession(
        base, [spec(files["f1"], 0.8, merge=merge), spec(files["f2"], -0.6, merge=merge)]
    ) as s:
        s.on_step(0.3)
        got = run(base)
    assert (got - want).abs().max().item() <= 1e-5


# --- stage gating -----------------------------------------------------------------------------


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
def test_same_file_in_both_stages_with_different_weights(pristine, base, files, monkeypatch, merge):
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
        assert (run(base) - run(merged(pristine, [(files["sd1"], 1.75)]))).abs().max() <= 1e-5
        s.on_step(0.1)
        assert s.active == {adapter: -0.25}
        assert (run(base) - run(merged(pristine, [(files["sd1"], -0.25)]))).abs().max() <= 1e-5
    with lora.LoraSession(base, specs[:1]):
        pass
    assert len(reads) == 1  # cached across sessions


def test_changed_file_is_reloaded(pristine, base, files, tmp_path):
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
        assert (run(base) - run(merged(pristine, [(files["sd2"], 1.0)]))).abs().max() <= 1e-5


def test_unused_adapters_are_released(pristine, base, files):
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
    assert list(base.state_dict()) == list(pristine.state_dict())
    assert torch.equal(run(base), run(pristine))


# --- isolation -------------------------------------------------------------------------------


class _Boom(Exception):
    pass


@pytest.mark.parametrize("merge", ["off", "on"])
@pytest.mark.parametrize("error", [None, _Boom, Interrupted, KeyboardInterrupt])
def test_session_leaves_base_untouched(pristine, base, files, error, merge):
    before = base_hash(pristine)
    weights = {n: p for n, p in base.named_parameters()}
    specs = [spec(files["f1"], 1.0, "high", merge=merge), spec(files["f2"], 1.0, "low", merge=merge)]
    try:
        with lora.LoraSession(base, specs) as s:
            s.on_step(1.0)
            run(base)
            s.on_step(0.2)
            if error is not None:
                raise error("stop mid-sampling")
    except (_Boom, Interrupted, KeyboardInterrupt):
        pass
    assert base_hash(base) == before
    assert none_active(base)
    for name, param in base.named_parameters():  # the very same Parameter objects are back
        if ".lora_" not in name:
            assert param is weights[name.replace(".base_layer.", ".")]
    assert torch.equal(run(base), run(pristine))
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
def test_two_branches_equal_their_separate_runs(pristine, base, files, merge):
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

    alone_a = sample(a, copy.deepcopy(pristine))
    alone_b = sample(b, copy.deepcopy(pristine))
    for _ in range(2):  # interleaved on the shared transformer
        for got, want in zip(sample(a, base), alone_a, strict=True):
            assert torch.equal(got, want)
        for got, want in zip(sample(b, base), alone_b, strict=True):
            assert torch.equal(got, want)


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "stage", "boundary", "match"),
    [
        (4.01, "both", 0.875, "weight: 4.01 is outside -4..4"),
        (-5, "both", 0.875, "weight: -5 is outside"),
        (float("nan"), "both", 0.875, "weight: nan"),
        ("1", "both", 0.875, "weight: expected a number"),
        (True, "both", 0.875, "weight: expected a number"),
        (1.0, "mid", 0.875, "stage: 'mid' is not one of both, high, low"),
        (1.0, "HIGH", 0.875, "stage: 'HIGH'"),
        (1.0, "high", 0.0, r"boundary: 0.0 is outside \(0, 1\)"),
        (1.0, "high", 1.0, r"boundary: 1.0 is outside \(0, 1\)"),
        (1.0, "low", -0.2, "boundary: -0.2"),
        (1.0, "low", None, "boundary: expected a sigma strictly between 0 and 1, got None"),
    ],
)
def test_bad_values_name_the_input(files, weight, stage, boundary, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lora_spec.make_lora_spec(files["f1"], weight, stage, boundary)
    with pytest.raises((ValueError, TypeError), match=match):
        lora_spec.LoraSpec(path=files["f1"], weight=weight, stage=stage, boundary=boundary)


@pytest.fixture
def models_dir(tmp_path, files):
    (tmp_path / "loras").mkdir()
    shutil.copyfile(files["f1"], tmp_path / "loras" / "one.safetensors")
    (tmp_path / "loras" / "garbage.safetensors").write_bytes(b"this is not a safetensors header")
    marker = tmp_path / "unpickled"
    with open(tmp_path / "loras" / "evil.ckpt", "wb") as f:  # unpickling it would create `marker`
        pickle.dump(_MakeDir(str(marker)), f)
    paths.set_models_dir(tmp_path)
    yield tmp_path
    paths.set_models_dir(None)


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
    with pytest.raises(ValueError, match="weight: 9.0 is outside"):
        HiDreamI1LoraLoader().apply(root, "one.safetensors", 9.0, "low", 0.9)


def test_runware_task_entry(models_dir):
    got = lora_spec.lora_spec_from_task(
        {"model": "one.safetensors", "weight": 0.8, "transformer": "high"}, None
    )
    assert (got.weight, got.stage, got.boundary, got.name) == (0.8, "high", 0.875, "one.safetensors")
    got = lora_spec.lora_spec_from_task({"model": "one.safetensors"}, None)
    assert (got.weight, got.stage) == (1.0, "both")
    with pytest.raises(ValueError, match=r"lora\[1\].weight: 4.5 is outside"):
        lora_spec.lora_spec_from_task({"model": "one.safetensors", "weight": 4.5}, None, field="lora[1]")
    with pytest.raises(ValueError, match=r"lora\[0\].transformer: 'middle'"):
        lora_spec.lora_spec_from_task(
            {"model": "one.safetensors", "transformer": "middle"}, None, field="lora[0]"
        )
    with pytest.raises(ValueError, match=r"lora\[0\].model: file 'nope.safetensors' not found"):
        lora_spec.lora_spec_from_task({"model": "nope.safetensors"}, None, field="lora[0]")
    with pytest.raises(ValueError, match="unknown key"):
        lora_spec.lora_spec_from_task({"model": "one.safetensors", "strength": 1}, None)


# --- through the sampler ---------------------------------------------------------------------


def _cond():
    from hidream_pack.hidream.model.text import Conditioning, PromptEmbeds

    g = torch.Generator().manual_seed(9)

    def embeds() -> PromptEmbeds:
        return PromptEmbeds(
            t5=torch.randn(1, 8, 32, generator=g),
            llama=torch.randn(4, 1, 8, 32, generator=g),
            pooled=torch.randn(1, 32, generator=g),
        )

    return Conditioning(positive=embeds(), negative=embeds())


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


def test_sampler_applies_stages_and_restores(pristine, base, files):
    """high + low through sample_latents equals switching two hand-merged copies at the boundary."""
    from hidream_pack.hidream.sampling.schedulers import SchedulerSpec, make_sampler

    sigmas = [float(x) for x in make_sampler(SchedulerSpec("Euler", 3.0), "full", 6).sigmas[:6]]
    n_high = len(lora_spec.stage_steps(sigmas, "high", 0.9))
    assert 0 < n_high < 6
    before = base_hash(base)
    got = _sample(base, [spec(files["f1"], 1.0, "high", 0.9), spec(files["f2"], -1.0, "low", 0.9)])

    hand = merged(pristine, [(files["sd1"], 1.0)])
    low = {n: p.detach().clone() for n, p in merged(pristine, [(files["sd2"], -1.0)]).named_parameters()}

    def swap(done: int, total: int) -> None:  # before step `done` runs
        if done == n_high:
            with torch.no_grad():
                for n, p in hand.named_parameters():
                    p.copy_(low[n])

    want = _sample(hand, callback=swap)
    assert (got - want).abs().max().item() <= 1e-4
    assert not torch.equal(got, _sample(pristine))
    assert base_hash(base) == before and none_active(base)
    assert torch.equal(_sample(base), _sample(pristine))


@pytest.mark.parametrize("error", [Interrupted, _Boom])
def test_sampler_cancel_restores(pristine, base, files, error):
    before = base_hash(base)

    def cancel(done: int, total: int) -> None:
        if done == 3:
            raise error("cancel")

    with pytest.raises(error):
        _sample(
            base, [spec(files["f1"], 1.0, "high", merge="on"), spec(files["f2"], 1.0, "low")], callback=cancel
        )
    assert base_hash(base) == before and none_active(base)
    assert torch.equal(_sample(base), _sample(pristine))


def test_merge_failure_half_way_restores(pristine, base, files, monkeypatch):
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
    assert none_active(base) and torch.equal(run(base), run(pristine))


# --- merge_at_boundary auto and idle wrappers ------------------------------------------------


def _wrappers_in_tree(model) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_auto_merges_when_a_copy_fits(pristine, base, files):
    assert lora_spec.LoraSpec(path=files["f1"], weight=1.0, stage="both").merge == "auto"  # the default
    with lora.LoraSession(base, [spec(files["f1"], 0.8, "high", merge="auto")]) as s:
        s.on_step(0.95)
        assert s.merged == {s._plan[0][0]: 0.8}
        assert _wrappers_in_tree(base) == 0  # merged and nothing live: plain modules only
        assert (run(base) - run(merged(pristine, [(files["sd1"], 0.8)]))).abs().max() <= 1e-5
    assert _wrappers_in_tree(base) > 0 and none_active(base)


def test_auto_merges_per_call_without_room(pristine, base, files, monkeypatch, caplog):
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
        want = merged(pristine, [(files["sd1"], 0.8), (files["sd2"], 0.5)])
        assert (per_call - run(want)).abs().max() <= 1e-5
        s.on_step(0.5)
        assert torch.equal(run(base), run(pristine))
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


def test_idle_wrappers_leave_the_forward_path(pristine, base, files):
    """A step with nothing live runs the base Linears themselves; live steps put wrappers back."""
    plain_linears = {n: m for n, m in pristine.named_modules() if isinstance(m, torch.nn.Linear)}
    with lora.LoraSession(base, [spec(files["f1"], 1.0, "high")]) as s:
        total = len(s._slots.slots)
        assert total > 0 and _wrappers_in_tree(base) == 0  # entered: nothing acts yet
        s.on_step(0.95)
        assert _wrappers_in_tree(base) == total
        s.on_step(0.5)  # low stage: nothing live
        assert _wrappers_in_tree(base) == 0
        assert {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)} == set(plain_linears)
        assert torch.equal(run(base), run(pristine))
        s.on_step(0.95)
        assert _wrappers_in_tree(base) == total
    assert _wrappers_in_tree(base) == total and none_active(base)


def test_wrappers_come_back_after_an_error(base, files):
    with pytest.raises(_Boom), lora.LoraSession(base, [spec(files["f1"], 1.0, "high")]) as s:
        s.on_step(0.5)
        total = len(s._slots.slots)
        assert total > 0 and _wrappers_in_tree(base) == 0
        raise _Boom
    assert _wrappers_in_tree(base) == total and none_active(base)


@pytest.mark.parametrize("value", [True, False, "yes", None, "AUTO"])
def test_bad_merge_mode_names_the_input(files, value):
    with pytest.raises(ValueError, match=f"merge_at_boundary: {value!r} is not one of auto, on, off"):
        lora_spec.make_lora_spec(files["f1"], 1.0, merge=value)


def test_free_memory_reads_the_os(monkeypatch):
    import sys

    from hidream_pack.hidream.model import devices

    with_psutil = devices.free_memory("cpu")
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    from_proc = devices.free_memory("cpu")
    assert with_psutil > 0 and from_proc > 0
    assert abs(with_psutil - from_proc) < 0.25 * with_psutil  # same quantity, two readers
    assert devices.free_memory("meta") is None


def test_interrupted_enter_or_exit_loses_no_wrapper(pristine, base, files, monkeypatch):
    """Wrappers taken out of the tree are recorded per transformer, so a failure or an interrupt
    while they are out (enter, exit) is repaired by the next session."""
    from hidream_pack.hidream.lora import apply as lora_apply
    from hidream_pack.hidream.model import devices

    want = run(merged(pristine, [(files["sd1"], 1.0)]))

    def check_next_session_applies() -> None:
        with lora.LoraSession(base, [spec(files["f1"], 1.0, "both", merge="off")]) as s:
            s.on_step(0.5)
            assert (run(base) - want).abs().max() <= 1e-5
            total = len(s._slots.slots)
        assert total > 0 and _wrappers_in_tree(base) == total and none_active(base)

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
    assert len(calls) == 3 and 0 < _wrappers_in_tree(base) < len(s._slots.slots)
    check_next_session_applies()
