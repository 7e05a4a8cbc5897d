"""Shared helpers for the native-MODEL tests: a real ComfyUI, its own HiDream model class at the
pack's tiny config with the pack's tiny weights, and ComfyUI's own sampling.

ComfyUI is found through ``COMFYUI_PATH``, else ``<repo>/.comfyui/ComfyUI``; without one the
tests skip and say how to install it. ComfyUI goes on ``sys.path`` only when a test asks for it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch
from hidream_pack.hidream.model import tiny

REPO = Path(__file__).resolve().parent.parent
INSTALL_HINT = (
    "ComfyUI not found (set COMFYUI_PATH or install it into the checkout with "
    "`bash ../shared/comfyui/install.sh .venv/bin/python .comfyui`)"
)


def comfyui_root() -> Path | None:
    for cand in (os.environ.get("COMFYUI_PATH"), REPO / ".comfyui" / "ComfyUI"):
        if cand and (Path(cand) / "comfy" / "model_base.py").is_file():
            return Path(cand)
    return None


def comfyui_version() -> tuple[int, ...]:
    """The version of the ComfyUI the tests run against (its ``comfyui_version.py``)."""
    root = comfyui_root()
    if root is None:
        pytest.skip(INSTALL_HINT)
    text = (root / "comfyui_version.py").read_text()
    number = text.split("__version__", 1)[1].split('"')[1]
    return tuple(int(part) for part in number.split("."))


def import_comfy():
    """Put ComfyUI on ``sys.path`` (CPU mode) and return ``comfy``, or skip the test."""
    root = comfyui_root()
    if root is None:
        pytest.skip(INSTALL_HINT)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    if "comfy.model_management" not in sys.modules and not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
        # PyTorch SDPA, as on a GPU: the CPU's default (sub-quadratic) reads free memory through
        # psutil on every call, which breaks each compiled block's graph in two
        comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models

    return comfy


@contextlib.contextmanager
def comfy_imported():
    """ComfyUI importable for the duration of a module's tests only: afterwards its path and the
    modules it brought (``folder_paths`` among them, which the pack takes as "inside ComfyUI")
    are gone again, so later test modules see a plain Python process."""
    before = set(sys.modules)
    try:
        yield import_comfy()
    finally:
        root = str(comfyui_root())
        for name in set(sys.modules) - before:
            origin = getattr(sys.modules.get(name), "__file__", None) or ""
            if origin.startswith(root) or name.split(".")[0] in ("comfy", "folder_paths", "comfy_api"):
                sys.modules.pop(name, None)
        while root in sys.path:
            sys.path.remove(root)


def native_model(transformer: torch.nn.Module, dtype: torch.dtype = torch.float32):
    """ComfyUI's own HiDream model at ``transformer``'s config with its weights (``tiny.comfy_model``)."""
    import_comfy()
    return tiny.comfy_model(transformer, dtype)


def conditioning(layers: int, seed: int = 1, tokens: int = 8, dim: int = 32):
    """(positive, negative) in ComfyUI's CONDITIONING format (what CLIPTextEncodeHiDream gives),
    and the same tensors as the pack's HIDREAM_COND."""
    from hidream_pack.hidream.model import text

    g = torch.Generator().manual_seed(seed)
    t5 = torch.randn(2, tokens, dim, generator=g)
    llama = torch.randn(layers, 2, tokens, dim, generator=g)
    pooled = torch.randn(2, dim, generator=g)

    pack = text.Conditioning(
        positive=text.PromptEmbeds(t5[1:], llama[:, 1:], pooled[1:]),
        negative=text.PromptEmbeds(t5[:1], llama[:, :1], pooled[:1]),
    )
    return tiny.comfy_conditioning(pack.positive), tiny.comfy_conditioning(pack.negative), pack


def sample(
    patcher,
    positive,
    negative,
    sigmas: torch.Tensor,
    *,
    cfg: float = 4.0,
    seed: int = 0,
    size: int = 64,
    sampler: str = "euler",
    batched: bool = True,
) -> torch.Tensor:
    """ComfyUI's own sampling (``comfy.sample.sample_custom``, as SamplerCustom runs it) of an
    empty ``size``x``size`` latent; ``batched=False`` makes ComfyUI run cond and uncond apart."""
    comfy = import_comfy()
    latent = torch.zeros(1, 16, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    ksampler = comfy.samplers.ksampler(sampler)
    base = patcher.model
    if not batched:  # ComfyUI batches conds only when it thinks memory allows
        base.memory_required = lambda *args, **kwargs: float("inf")
    try:
        with torch.no_grad():
            return comfy.sample.sample_custom(
                patcher,
                noise,
                cfg,
                ksampler,
                sigmas,
                positive,
                negative,
                latent,
                noise_mask=None,
                disable_pbar=True,
                seed=seed,
            )
    finally:
        base.__dict__.pop("memory_required", None)
