"""LoRA file formats -> one layout: per transformer module, ``down`` [r, in], ``up`` [out, r], alpha.

HiDream LoRAs circulate in several key layouts. They all describe the same thing, a low-rank
update ``W += (alpha / rank) * up @ down`` per Linear module, and differ only in how the module
is named and what the two factors are called:

============================  ==========================================================
diffusers / PEFT              ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``
                              (alpha in the ``lora_adapter_metadata`` header, else rank)
PEFT model save               ``base_model.model.<module>.lora_A.weight`` / ``lora_B``
ComfyUI / ai-toolkit          ``diffusion_model.<module>.lora_A|lora_down.weight`` / ``lora_B|lora_up`` + ``.alpha``
kohya (sd-scripts)            ``lora_unet_<module with _ for .>.lora_down.weight`` / ``lora_up`` + ``.alpha``
OneTrainer / OMI              ``transformer.<module>.lora_down.weight`` / ``lora_up`` + ``.alpha``
LyCORIS LoCon (SimpleTuner)   ``lycoris_<module with _ for .>.lora_down.weight`` / ``lora_up`` + ``.alpha``
============================  ==========================================================

Underscored names (kohya, LyCORIS) are mapped back to dotted module names by matching them
against the model's own Linear modules, never by guessing where the dots were. A file whose
keys fit no module is an error that says how many matched (diffusers itself silently loads
nothing for such files); a file that fits partly loads with a warning naming how many keys
were skipped. Formats that are not a plain low-rank product (LoKr, LoHa, DoRA, ...) are
refused by name rather than half-applied.

Only ``.safetensors`` is read: it holds raw tensors and a JSON header, so opening an untrusted
file cannot run code (a pickled ``.ckpt``/``.pt`` can).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = (
    "diffusers/PEFT",
    "ComfyUI/ai-toolkit (diffusion_model.*)",
    "kohya (lora_unet_*)",
    "OneTrainer/OMI",
    "LyCORIS LoCon (lycoris_*)",
)

# (key fragment, format name): any key containing the fragment marks a format we refuse.
_UNSUPPORTED_MARKERS = (
    (".lokr_", "LyCORIS LoKr"),
    (".hada_", "LyCORIS LoHa"),
    (".dora_scale", "DoRA"),
    (".lora_magnitude_vector", "DoRA"),
    (".magnitude", "DoRA"),
    (".lora_mid.", "LyCORIS LoCon with Tucker decomposition (lora_mid)"),
    (".oft_", "OFT"),
    (".a1.weight", "GLoRA"),
    (".diff", "full weight difference (diff)"),
    (".w_norm", "full weight difference (w_norm)"),
    (".lora_B.bias", "LoRA with bias (lora_B.bias)"),
    (".lora_up.bias", "LoRA with bias (lora_up.bias)"),
)

# Leading prefixes, longest first; ``dotted`` tells whether the module path keeps its dots.
_PREFIXES = (
    ("model.diffusion_model.", "comfy", True),
    ("diffusion_model.", "comfy", True),
    ("base_model.model.", "peft", True),
    ("transformer.", "transformer", True),
    ("lora_transformer_", "onetrainer", False),
    ("lora_unet_", "kohya", False),
    ("lycoris_", "lycoris", False),
)

_FACTOR_RE = re.compile(r"^(?P<module>.+?)\.(?P<factor>lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight$")
_DOWN = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up"}


@dataclass(frozen=True)
class LoraModule:
    """One module's low-rank update: ``delta W = (alpha / rank) * up @ down``."""

    down: torch.Tensor  # [rank, in_features]
    up: torch.Tensor  # [out_features, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class ConvertedLora:
    """A LoRA file in module terms, plus how well it matched the model."""

    format: str
    modules: dict[str, LoraModule]
    total_keys: int
    used_keys: int
    skipped_keys: tuple[str, ...]


@dataclass
class _Entry:
    keys: list[str]
    style: str
    factor_names: set[str]
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


def read_lora_file(path: str | Path, field: str = "lora") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a ``.safetensors`` file; anything else is refused unread."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise ValueError(
            f"{field}: {p.name!r} is not a .safetensors file; only .safetensors LoRAs are loaded "
            "(.ckpt/.pt/.bin files are pickles that can run code when opened)"
        )
    if not p.is_file():
        raise ValueError(f"{field}: LoRA file {str(p)!r} does not exist")
    from ..model.checkpoint import read_header

    read_header(p, field)  # pickles, hostile shapes, offsets and nesting: one line naming the file
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{field}: {p.name!r} is not a readable .safetensors file: {exc}") from exc
    return tensors, metadata


def unsupported_format(keys: list[str], metadata: Mapping[str, str] | None = None) -> str | None:
    """Name of a format we refuse (LoKr, LoHa, DoRA, ...) found in the keys, else None."""
    for key in keys:
        for marker, name in _UNSUPPORTED_MARKERS:
            if marker in key:
                return name
    config = _diffusers_metadata(metadata)
    if config.get("use_dora"):
        return "DoRA"
    return None


def _diffusers_metadata(metadata: Mapping[str, str] | None) -> dict:
    """diffusers' ``lora_adapter_metadata`` header (a LoraConfig dict, maybe ``transformer.``-prefixed)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(config, dict):
        return {}
    prefixed = {k[len("transformer.") :]: v for k, v in config.items() if k.startswith("transformer.")}
    return prefixed or config


def _finite_alpha(value: object, what: str, field: str, source: str) -> float:
    """A finite number (not a boolean, not a string); NaN or Inf alpha would give NaN images."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value):
        raise ValueError(f"{field}: {source}: {what} is {json.dumps(value)[:40]}; expected a finite number")
    return float(value)


def _pattern_matches(pattern: str, module: str) -> bool:
    """PEFT ``alpha_pattern`` keys name module-name suffixes (``attn.to_q`` matches ``blocks.0.attn.to_q``).

    They are compared as text, never compiled: a file's own text run as a regex can backtrack
    for hours. A leading ``^`` (our own ``to_peft`` form, anchored and escaped) means the whole name.
    """
    if pattern.startswith("^"):
        return re.sub(r"\\(.)", r"\1", pattern[1:]) == module
    return module == pattern or module.endswith("." + pattern)


def _metadata_alpha(
    config: dict, module: str, rank: int, field: str = "lora", source: str = "LoRA"
) -> float | None:
    """Alpha for ``module`` from a diffusers/PEFT config, as the plain ``alpha / rank`` convention.

    rsLoRA scales by ``alpha / sqrt(rank)``; it is rewritten as an equivalent plain alpha.
    """
    if not config:
        return None
    alpha = config.get("lora_alpha")
    if alpha is not None:
        alpha = _finite_alpha(alpha, "lora_alpha", field, source)
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise ValueError(f"{field}: {source}: alpha_pattern is not an object of module name -> alpha")
    for pattern, value in patterns.items():
        if _pattern_matches(pattern, module):
            alpha = _finite_alpha(value, f"alpha_pattern[{pattern[:40]!r}]", field, source)
            break
    if alpha is None:
        return None
    if config.get("use_rslora"):
        alpha = alpha * rank / math.sqrt(rank)
    return alpha


def _split_prefix(key: str) -> tuple[str, str, bool]:
    for prefix, style, dotted in _PREFIXES:
        if key.startswith(prefix):
            return style, key[len(prefix) :], dotted
    return "bare", key, True


def _underscore_index(module_names: list[str]) -> dict[str, str | None]:
    """``a_b_c`` -> ``a.b_c`` for every module; None marks an ambiguous underscored name."""
    index: dict[str, str | None] = {}
    for name in module_names:
        flat = name.replace(".", "_")
        index[flat] = None if flat in index and index[flat] != name else name
    return index


def _parse_key(key: str) -> tuple[str, str, str, bool] | None:
    """(style, module path as written, part, dotted) where part is down/up/alpha; None if neither."""
    style, rest, dotted = _split_prefix(key)
    if rest.endswith(".alpha"):
        return style, rest[: -len(".alpha")], "alpha", dotted
    m = _FACTOR_RE.match(rest)
    if m is None:
        return None
    return style, m.group("module"), m.group("factor"), dotted


def _format_name(styles: Counter, factor_names: set[str]) -> str:
    names = []
    down_up = bool(factor_names & {"lora_down", "lora_up"})
    for style, _ in styles.most_common():
        if style == "transformer":
            names.append("OneTrainer/OMI" if down_up else "diffusers/PEFT")
        elif style == "comfy":
            names.append("ComfyUI/ai-toolkit (diffusion_model.*)")
        elif style == "kohya":
            names.append("kohya (lora_unet_*)")
        elif style == "onetrainer":
            names.append("OneTrainer (lora_transformer_*)")
        elif style == "lycoris":
            names.append("LyCORIS LoCon (lycoris_*)")
        elif style == "peft":
            names.append("PEFT (base_model.model.*)")
        else:
            names.append("diffusers/PEFT (no prefix)")
    return " + ".join(names)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    module_shapes: Mapping[str, tuple[int, int]],
    metadata: Mapping[str, str] | None = None,
    source: str = "LoRA",
    field: str = "lora",
) -> ConvertedLora:
    """Match a LoRA state dict against the model's Linear modules.

    Args:
        state_dict: the file's tensors, any supported layout.
        module_shapes: dotted module name -> (out_features, in_features) of every Linear the
            LoRA may patch (``linear_module_shapes``).
        metadata: the safetensors header (diffusers keeps lora_alpha there).
        source: file name for messages.
        field: the input name for messages.
    """
    keys = list(state_dict)
    bad = unsupported_format(keys, metadata)
    if bad is not None:
        raise ValueError(
            f"{field}: {source} is a {bad} file, which is not supported; supported: plain low-rank LoRA "
            f"in the {', '.join(SUPPORTED_FORMATS)} layouts"
        )
    config = _diffusers_metadata(metadata)
    flat_index = _underscore_index(list(module_shapes))
    entries: dict[str, _Entry] = {}
    for key in keys:
        parsed = _parse_key(key)
        if parsed is None:
            continue
        style, written, part, dotted = parsed
        module = written if dotted else flat_index.get(written, "")
        if module is None:
            raise ValueError(f"{field}: {source}: key {key!r} fits more than one module of this model")
        if module not in module_shapes:
            continue
        entry = entries.setdefault(module, _Entry(keys=[], style=style, factor_names=set()))
        if entry.style != style:
            raise ValueError(
                f"{field}: {source}: module {module!r} appears twice ({key!r}); the file is corrupt"
            )
        entry.keys.append(key)
        value = state_dict[key]
        if part == "alpha":
            if value.numel() != 1:
                raise ValueError(
                    f"{field}: {source}: {key!r} has shape {list(value.shape)}; expected one number (alpha)"
                )
            entry.alpha = _finite_alpha(float(value.float().reshape(-1)[0]), repr(key), field, source)
            continue
        entry.factor_names.add(part)
        if getattr(entry, _DOWN[part]) is not None:
            raise ValueError(f"{field}: {source}: module {module!r} has two {_DOWN[part]} factors ({key!r})")
        setattr(entry, _DOWN[part], value)

    modules: dict[str, LoraModule] = {}
    used: set[str] = set()
    styles: Counter = Counter()
    factor_names: set[str] = set()
    for module, entry in entries.items():
        if entry.down is None or entry.up is None:
            continue  # half a pair: counted as skipped below
        out_f, in_f = module_shapes[module]
        down, up = entry.down, entry.up
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(
                f"{field}: {source}: {module!r} has factors of shapes {tuple(down.shape)} and "
                f"{tuple(up.shape)}, which do not form a low-rank product"
            )
        if down.shape[1] != in_f or up.shape[0] != out_f:
            raise ValueError(
                f"{field}: {source}: {module!r} is {in_f}->{out_f} in this model but the LoRA's factors are "
                f"{tuple(down.shape)} / {tuple(up.shape)}; the LoRA was made for a different model"
            )
        rank = int(down.shape[0])
        if rank == 0:
            raise ValueError(
                f"{field}: {source}: {module!r} has rank-0 factors {tuple(down.shape)}; expected rank >= 1"
            )
        for factor, tensor in (("down", down), ("up", up)):
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"{field}: {source}: {module!r} {factor} factor ({tensor.dtype}) has non-finite or "
                    "non-float values; expected finite floating-point numbers"
                )
        alpha = entry.alpha
        if alpha is None:
            alpha = _metadata_alpha(config, module, rank, field, source)
        modules[module] = LoraModule(down=down, up=up, alpha=float(rank) if alpha is None else alpha)
        used.update(entry.keys)
        styles[entry.style] += 1
        factor_names |= entry.factor_names

    skipped = tuple(k for k in keys if k not in used)
    if not modules:
        sample = ", ".join(repr(k) for k in keys[:3]) or "none"
        raise ValueError(
            f"{field}: {source}: 0 of {len(keys)} keys match a HiDream-I1 transformer module, so nothing "
            f"would change; it is not a HiDream-I1 LoRA in a supported layout ({', '.join(SUPPORTED_FORMATS)}). "
            f"First keys: {sample}"
        )
    fmt = _format_name(styles, factor_names)
    if skipped:
        log.warning(
            "%s (%s): loaded %d of %d keys; skipped %d that match no HiDream-I1 transformer module (e.g. %s)",
            source,
            fmt,
            len(used),
            len(keys),
            len(skipped),
            ", ".join(skipped[:3]),
        )
    return ConvertedLora(
        format=fmt, modules=modules, total_keys=len(keys), used_keys=len(used), skipped_keys=skipped
    )


def linear_module_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear a LoRA may patch, named as in the plain model.

    Modules already wrapped by PEFT count under the wrapper's name (its ``base_layer``); the
    wrappers' own LoRA Linears are not targets.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    shapes: dict[str, tuple[int, int]] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name)
            module = module.get_base_layer()
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.out_features, module.in_features)
    return shapes


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    return (
        weight.dtype
        if weight.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        else torch.bfloat16
    )


def to_peft(converted: ConvertedLora, transformer: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT state dict + LoraConfig kwargs (what ``load_lora_adapter`` takes) for a converted LoRA.

    Factors go to each base weight's device and float dtype; per-module rank and alpha are kept
    through ``rank_pattern`` / ``alpha_pattern`` (anchored, escaped module names).
    """
    state: dict[str, torch.Tensor] = {}
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    for module, lm in converted.modules.items():
        layer = transformer.get_submodule(module)
        base_weight = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
        kw = {"device": base_weight.device, "dtype": _adapter_dtype(base_weight)}
        state[f"{module}.lora_A.weight"] = lm.down.to(**kw, copy=True).contiguous()
        state[f"{module}.lora_B.weight"] = lm.up.to(**kw, copy=True).contiguous()
        ranks[lm.rank] += 1
        alphas[lm.alpha] += 1
    r = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    rank_pattern = {f"^{re.escape(m)}": lm.rank for m, lm in converted.modules.items() if lm.rank != r}
    alpha_pattern = {f"^{re.escape(m)}": lm.alpha for m, lm in converted.modules.items() if lm.alpha != alpha}
    config = {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        # One anchored regex: peft tests every module of the model against the targets, and a
        # list of ~1000 names costs a Python endswith loop per module (seconds on the full model).
        "target_modules": "(?:" + "|".join(re.escape(m) for m in sorted(converted.modules)) + ")",
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": False,
    }
    return state, config
