"""Shared pieces of the LoRA session tests (``test_lora_*.py``): tiny peft LoRAs, kohya files,
the hand merge every numeric check compares against, and the ``base`` / ``files`` fixtures.

Reference for every numeric check: the LoRA merged by hand into a copy of the base weights,
``W + weight * (alpha / rank) * B @ A``. Test modules bind the fixtures under their names
(``base, files = _lora.base, _lora.files``); the tiny transformer is conftest's
``tiny_transformer``, so ``files`` is built once per test module, as before the split."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from diffusers import UniPCMultistepScheduler
from hidream_pack.hidream.lora import spec as lora_spec
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

TARGETS = r".*\.(to_q|to_k|to_v|to_out|to_q_t|to_k_t|to_v_t|to_out_t|w1|w2|w3)$"
RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2


@pytest.fixture
def base(tiny_transformer):
    """A fresh copy per test, so adapter caches never leak between tests."""
    return copy.deepcopy(tiny_transformer)


def make_lora(tiny_transformer, seed: int, targets: str = TARGETS) -> dict[str, torch.Tensor]:
    """A peft LoRA on the tiny model (rank 4), with random nonzero B; peft keys, no prefix."""
    torch.manual_seed(seed)
    model = copy.deepcopy(tiny_transformer)
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


def merged(tiny_transformer, loras: list[tuple[dict[str, torch.Tensor], float]]) -> torch.nn.Module:
    """Hand merge: W + weight * (alpha / rank) * B @ A for each (lora, weight)."""
    model = copy.deepcopy(tiny_transformer)
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
def files(tiny_transformer, tmp_path_factory):
    """Two LoRAs (different seeds) as kohya files, plus their peft state dicts."""
    d = tmp_path_factory.mktemp("loras")
    sd1, sd2 = make_lora(tiny_transformer, 11), make_lora(tiny_transformer, 22)
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


class Boom(Exception):
    """An ordinary error raised mid-session by a test."""


def wrappers_in_tree(model) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())
