"""Stage LoRA on ComfyUI's native HiDream ``MODEL``: a LoRA that acts only on the high-noise
steps (sigma >= boundary), only on the low-noise ones, or on both.

Any file the pack reads (``hidream.lora.formats``: diffusers/PEFT, ComfyUI/ai-toolkit, kohya,
OneTrainer, LyCORIS LoCon) is converted to ComfyUI's own LoRA keys and loaded by ComfyUI's
``comfy.lora.load_lora`` into the patcher with ``add_patches``, exactly what core
*LoraLoaderModelOnly* does; stage ``both`` stops there, so it is core's behaviour.

Why not ComfyUI's hook keyframes: they attach to conditioning, schedule by percent of the
run rather than by sigma, and keep a separate patched copy per hook group; none of that is
"this MODEL's LoRA, switched at a sigma". So ``high`` / ``low`` switch the patches at the
boundary through the model patcher: an OUTER_SAMPLE wrapper records the run's patcher and
sigmas; a DIFFUSION_MODEL wrapper, before each call, takes this LoRA's entries out of (or
puts them back into) ``patcher.patches`` and recomputes each weight patched in place from
the patcher's own backup with ``patch_weight_to_device`` (weights ComfyUI patches on the fly
in low-VRAM mode read ``patcher.patches`` at every cast). When sampling ends, also on error,
the patches and weights are put back as ComfyUI loaded them. A step's stage follows its
starting sigma (as on the HIDREAM_MODEL path), and the active set is published in
``transformer_options`` so the native caches compute the step after a switch.
"""

from __future__ import annotations

import bisect
import logging
from pathlib import Path

import torch

from ..lora.formats import convert_state_dict, linear_module_shapes, read_lora_file
from ..lora.spec import stage_includes, validate_lora
from .cache import STAGE_KEY, require_hidream

log = logging.getLogger(__name__)

KEY = "hidream_stage_lora"
RUN_KEY = "hidream_stage_lora_run"


def comfy_lora_state_dict(path: str | Path, model, field: str = "lora_name") -> dict[str, torch.Tensor]:
    """A LoRA file in any layout the pack reads, as ComfyUI-format keys
    (``diffusion_model.<module>.lora_up.weight`` / ``lora_down.weight`` / ``alpha``)."""
    tensors, metadata = read_lora_file(path, field)
    shapes = linear_module_shapes(model.model.diffusion_model)
    converted = convert_state_dict(tensors, shapes, metadata, source=Path(path).name, field=field)
    out: dict[str, torch.Tensor] = {}
    for module, lm in converted.modules.items():
        out[f"diffusion_model.{module}.lora_up.weight"] = lm.up
        out[f"diffusion_model.{module}.lora_down.weight"] = lm.down
        out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(lm.alpha))
    return out


class StageLora:
    """One stage LoRA on one MODEL: which patch entries are its own, and when they act.

    Shared (not copied) by the MODEL's clones: it never changes after the node ran."""

    def __init__(self, entries: dict[str, list], stage: str, boundary: float, name: str) -> None:
        self.entries = entries
        self.stage = stage
        self.boundary = boundary
        self.name = name

    def __deepcopy__(self, memo) -> StageLora:
        return self


def apply_stage_lora(
    model, path: str | Path, name: str, strength: float, stage: str, boundary: float, node_id: str
):
    """``model.clone()`` with the LoRA's patches added (the input MODEL is unchanged)."""
    import comfy.lora
    import comfy.patcher_extension

    require_hidream(model, node_id)
    validate_lora(name, strength, stage, boundary)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(comfy_lora_state_dict(path, model), key_map)
    out = model.clone()
    before = {k: list(v) for k, v in out.patches.items()}
    out.add_patches(loaded, strength)
    if stage == "both":
        return out
    entries = {}
    for key, patches in out.patches.items():
        old = before.get(key, [])
        mine = [p for p in patches if not any(p is q for q in old)]
        if mine:
            entries[key] = mine
    opts = out.model_options.setdefault("transformer_options", {})
    opts[KEY] = (*opts.get(KEY, ()), StageLora(entries, stage, boundary, name))
    wrappers = comfy.patcher_extension.WrappersMP
    for kind, fn in ((wrappers.OUTER_SAMPLE, _outer_sample), (wrappers.DIFFUSION_MODEL, _diffusion_model)):
        if not out.wrappers.get(kind, {}).get(KEY):
            out.add_wrapper_with_key(kind, KEY, fn)
    return out


class _Run:
    """One sampling call: the patcher, the sigmas, and which stage LoRAs are on now."""

    def __init__(self, patcher, loras: tuple[StageLora, ...], sigmas: torch.Tensor) -> None:
        self.patcher = patcher
        self.loras = loras
        self.desc = [-float(s) for s in sigmas.detach().cpu().flatten()]
        self.on = {id(lo): True for lo in loras}  # ComfyUI loads the MODEL with every patch
        self.full: dict[str, list] | None = None  # each key's patch list as ComfyUI loaded it

    def step_sigma(self, sigma: float) -> float:
        """The starting sigma of the step this call belongs to."""
        slack = 1e-5 * (1.0 + abs(sigma))
        i = min(max(bisect.bisect_right(self.desc, -sigma + slack) - 1, 0), max(len(self.desc) - 2, 0))
        return -self.desc[i]

    def switch(self, wanted: dict[int, bool]) -> None:
        """Put each stage LoRA's entries in or out of the patcher and recompute those weights."""
        import comfy.utils

        changed = {k for lo in self.loras if wanted[id(lo)] != self.on[id(lo)] for k in lo.entries}
        if not changed:
            return
        p = self.patcher
        if self.full is None:
            self.full = {k: list(p.patches.get(k, [])) for lo in self.loras for k in lo.entries}
        self.on = dict(wanted)
        off = [e for lo in self.loras if not self.on[id(lo)] for es in lo.entries.values() for e in es]
        for key in changed:
            p.patches[key] = [e for e in self.full[key] if not any(e is x for x in off)]
            if key in p.backup:  # patched in place: recompute from the pristine weight, as ComfyUI does
                device = comfy.utils.get_attr(p.model, key).device
                saved = p.backup[key]
                if saved.inplace_update:
                    comfy.utils.copy_to_param(p.model, key, saved.weight)
                else:
                    comfy.utils.set_attr_param(p.model, key, saved.weight.to(device))
                p.patch_weight_to_device(key, device_to=device)

    def restore(self) -> None:
        self.switch({id(lo): True for lo in self.loras})


def _outer_sample(executor, *args, **kwargs):
    import comfy.model_patcher

    guider = executor.class_obj
    original = guider.model_options
    loras = original["transformer_options"][KEY]
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    run = _Run(guider.model_patcher, loras, sigmas)
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    guider.model_options["transformer_options"][RUN_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original
        run.restore()


def _diffusion_model(executor, *args, **kwargs):
    opts = kwargs.get("transformer_options")
    opts = opts if isinstance(opts, dict) else args[-1]
    run: _Run | None = opts.get(RUN_KEY)
    if run is not None:
        sigma = opts.get("sigmas")
        step_sigma = run.step_sigma(float(sigma.max()) if sigma is not None else 1.0)
        wanted = {id(lo): stage_includes(lo.stage, step_sigma, lo.boundary) for lo in run.loras}
        run.switch(wanted)
        opts[STAGE_KEY] = tuple(wanted.values())
    return executor(*args, **kwargs)
