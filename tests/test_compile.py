"""Regional torch.compile of the blocks: graphs per block class, caches, LoRA, fallback, node.

Graph counts, guards and recompiles are dynamo's, the same for every backend, so most tests
compile with the ``eager`` backend (seconds); one test runs inductor for the numerics. Each
test starts from ``torch._dynamo.reset()`` so counts do not depend on test order.
"""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
from hidream_pack.hidream.cache import policy as cache_mod
from hidream_pack.hidream.cache.config import DBCacheConfig, FirstBlockCacheConfig
from hidream_pack.hidream.forward import compile as compile_mod
from hidream_pack.hidream.forward.runner import TransformerRunner
from hidream_pack.hidream.limits.check import show
from hidream_pack.hidream.lora import session as lora
from hidream_pack.hidream.lora import spec as lora_spec
from hidream_pack.hidream.model import tiny
from hidream_pack.hidream.model.handle import HiDreamModel
from hidream_pack.hidream.sampling.loop import SampleSettings, sample_latents
from hidream_pack.hidream.sampling.schedulers import SchedulerSpec
from hidream_pack.nodes.loaders import HiDreamI1DiffusersLoader, HiDreamI1ModelLoader
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

BLOCK_CLASSES = 2  # double-stream and single-stream


def _inputs(batch: int = 2, side: int = 16, t: float = 731.0, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 16, side, side, generator=g),
        torch.full((batch,), t),
        torch.randn(batch, 9, 32, generator=g),
        torch.randn(4, batch, 11, 32, generator=g),
        torch.randn(batch, 32, generator=g),
    )


def _forward(runner, **kw) -> torch.Tensor:
    with torch.no_grad():
        return runner.forward(*_inputs(**kw))


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


# -- one graph per block class ------------------------------------------------------------------
def test_one_graph_per_block_class_shared_by_every_block(tiny_transformer, eager_backend):
    eager = TransformerRunner(tiny_transformer, moe="grouped")
    compiled = TransformerRunner(tiny_transformer, compile="blocks")
    before = compile_mod.graph_count()
    got = _forward(compiled)
    assert compile_mod.graph_count() - before == BLOCK_CLASSES
    assert _graph_breaks() == 0  # no host sync inside a block (an .item() would break the graph)
    assert compiled.compiled
    assert torch.equal(got, _forward(eager))
    # another timestep, another runner on the same weights: nothing new to compile
    _forward(compiled, t=250.0)
    _forward(TransformerRunner(tiny_transformer, compile="blocks"), t=100.0)
    assert compile_mod.graph_count() - before == BLOCK_CLASSES


def test_diffusers_moe_would_break_every_graph(tiny_transformer, eager_backend):
    """What the static MoE removes: diffusers' MoE copies counts to the CPU inside the block."""
    _forward(TransformerRunner(tiny_transformer, moe=None, compile="blocks"))
    assert _graph_breaks() > 0


def test_skipped_blocks_cause_no_recompile(tiny_transformer, eager_backend):
    runner = TransformerRunner(tiny_transformer, compile="blocks")
    _forward(runner)  # compiles at this size and batch
    before = compile_mod.graph_count()
    x, _, t5, llama, pooled = _inputs()
    for configs in (
        (FirstBlockCacheConfig(threshold=1.0),),
        (DBCacheConfig(threshold=1.0, refresh_interval=3),),
    ):
        session = cache_mod.open_cache_session(configs, "full", 6)
        with torch.no_grad():
            for i in range(6):
                session.begin_step(i)
                t = torch.full((2,), 1000.0 * (1 - i / 6))
                x = x - 0.1 * runner.forward(x, t, t5, llama, pooled, policy=session.policy())
        assert session.reused_steps()  # blocks were really skipped
    assert compile_mod.graph_count() == before


# -- LoRA stages ---------------------------------------------------------------------------------
def _lora_file(tiny_transformer, seed: int, path) -> str:
    torch.manual_seed(seed)
    model = copy.deepcopy(tiny_transformer)
    targets = r".*\.(to_q|to_k|to_v|w1|w2|w3)$"
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8.0, target_modules=targets), model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}, str(path))
    return str(path)


@pytest.mark.parametrize(
    ("merge", "new_graphs"), [("on", [BLOCK_CLASSES, 0, 0, 0]), ("off", [BLOCK_CLASSES] * 2 + [0, 0])]
)
def test_lora_stage_switches_compile_once_per_lora_state(
    tiny_transformer, eager_backend, tmp_path, merge, new_graphs
):
    """high stage -> low stage -> high -> low. Merged LoRAs swap weight tensors, which are graph
    inputs: no recompile. Live ones (PEFT adapters) change the modules dynamo guards on: each
    LoRA state compiles each block class once, and a state seen before compiles nothing."""
    base = copy.deepcopy(tiny_transformer)
    a, b = (_lora_file(tiny_transformer, seed, tmp_path / f"{seed}.safetensors") for seed in (11, 22))
    specs = [
        lora_spec.LoraSpec(path=a, weight=0.8, stage="high", merge=merge),
        lora_spec.LoraSpec(path=b, weight=-0.5, stage="low", merge=merge),
    ]
    runner, eager = TransformerRunner(base, compile="blocks"), TransformerRunner(base, moe="grouped")
    before, added = compile_mod.graph_count(), []
    with lora.LoraSession(base, specs) as session:
        for sigma in (0.95, 0.3, 0.95, 0.3):
            session.on_step(sigma)
            start = compile_mod.graph_count()
            got = _forward(runner)
            added.append(compile_mod.graph_count() - start)
            assert torch.equal(got, _forward(eager))
    assert added == new_graphs
    assert compile_mod.graph_count() - before == sum(new_graphs)


# -- fallback ---------------------------------------------------------------------------------
def test_unavailable_compile_runs_eagerly_with_one_warning(
    tiny_transformer, eager_backend, monkeypatch, caplog
):
    monkeypatch.setattr(compile_mod, "unavailable_reason", lambda device: "no C++ compiler (test)")
    want = _forward(TransformerRunner(tiny_transformer, moe="grouped"))
    before = compile_mod.graph_count()
    with caplog.at_level(logging.WARNING, logger=compile_mod.__name__):
        runners = [TransformerRunner(tiny_transformer, compile="blocks") for _ in range(2)]
        outs = [_forward(r) for r in runners for _ in range(2)]
    warnings = [r.getMessage() for r in caplog.records if r.name == compile_mod.__name__]
    assert warnings == ["compile=blocks: running the blocks eagerly instead: no C++ compiler (test)"]
    assert all(torch.equal(o, want) for o in outs)
    assert compile_mod.graph_count() == before and not runners[0].compiled


def test_failing_compile_runs_eagerly_with_one_warning(tiny_transformer, eager_backend, monkeypatch, caplog):
    from torch._dynamo.exc import TorchDynamoException

    def broken(block):
        def call(*args):
            raise TorchDynamoException("backend exploded\nlong traceback")

        return call

    monkeypatch.setattr(compile_mod, "_compiled", broken)
    runner = TransformerRunner(tiny_transformer, compile="blocks")
    with caplog.at_level(logging.WARNING, logger=compile_mod.__name__):
        got = [_forward(runner) for _ in range(2)]
    warnings = [r.getMessage() for r in caplog.records if r.name == compile_mod.__name__]
    assert len(warnings) == 1
    assert warnings[0].endswith("failed: backend exploded")
    assert torch.equal(got[0], _forward(TransformerRunner(tiny_transformer, moe="grouped"))) and torch.equal(
        got[0], got[1]
    )
    assert not runner.compiled


def test_compile_is_available_here_on_the_cpu():
    """This machine has g++: the fallback tests above are not what runs in the bench."""
    assert compile_mod.unavailable_reason("cpu") is None


def test_inductor_matches_eager(tiny_transformer):
    """The real backend on this CPU: inductor's fused kernels round differently, within 1e-5."""
    torch._dynamo.reset()
    runner = TransformerRunner(tiny_transformer, compile="blocks")
    got = _forward(runner, batch=1)
    assert runner.compiled
    assert (got - _forward(TransformerRunner(tiny_transformer, moe=None), batch=1)).abs().max().item() <= 1e-5
    torch._dynamo.reset()


# -- the sampler and the nodes -------------------------------------------------------------
def _cond():
    return tiny.random_conditioning(7, t5_tokens=9, llama_tokens=11)


def test_sampling_with_compile_equals_eager_and_logs_its_graphs(tiny_transformer, eager_backend, caplog):
    eager = HiDreamModel(
        transformer=tiny_transformer, variant="full", dtype=torch.float32, device=torch.device("cpu")
    )
    compiled = HiDreamModel(
        transformer=tiny_transformer,
        variant="full",
        dtype=torch.float32,
        device=torch.device("cpu"),
        compile="blocks",
    )
    settings = SampleSettings(width=128, height=128, steps=3, cfg=4.0, seed=5)
    want = sample_latents(eager, _cond(), SchedulerSpec("FlowMatchEulerDiscreteScheduler"), settings)
    with caplog.at_level(logging.INFO, logger="hidream_pack.hidream.sampling.loop"):
        got = sample_latents(compiled, _cond(), SchedulerSpec("FlowMatchEulerDiscreteScheduler"), settings)
    assert torch.equal(got.latents, want.latents)
    assert "compile=blocks: 2 graph(s) compiled during this call" in caplog.text


@pytest.mark.parametrize("node", [HiDreamI1ModelLoader, HiDreamI1DiffusersLoader])
def test_loaders_offer_compile_off_and_blocks(node):
    choices, options = node.INPUT_TYPES()["optional"]["compile"]
    assert choices == ["off", "blocks"] and options["default"] == "off"


@pytest.mark.parametrize("value", ["on", "Blocks", None, 1])
def test_bad_compile_value_is_an_error_naming_it(value):
    with pytest.raises(
        ValueError, match=rf"^compile: got {re.escape(show(value))}; allowed: one of off, blocks"
    ):
        HiDreamI1ModelLoader().load("x.safetensors", "auto", "bf16", "gpu", compile=value)


def test_compile_handle_is_new_and_shares_the_weights(tiny_transformer):
    from hidream_pack.nodes.loaders import _with_compile

    base = HiDreamModel(
        transformer=tiny_transformer, variant="full", dtype=torch.float32, device=torch.device("cpu")
    )
    compiled = _with_compile(base, "blocks")
    assert compiled.compile == "blocks" and base.compile == "off"
    assert compiled.transformer is base.transformer
    assert _with_compile(base, "off") is base
