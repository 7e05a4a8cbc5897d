"""Model-folder resolution: inside ComfyUI through ``folder_paths``, outside through a models dir.

Model names come from widgets and task JSON, so they are untrusted: a name resolves only to a
file inside one of the known model folders (no absolute paths, no ``..``), and only
``.safetensors`` files load. Pickle checkpoints (``.ckpt``, ``.pt``, ``.bin``...) are refused
by name, never opened: unpickling runs arbitrary code.

Outside ComfyUI (CLI, tests) the models dir set by :func:`set_models_dir` (``--models-dir``)
is laid out like ComfyUI's ``models/``: ``diffusion_models/``, ``text_encoders/``, ``vae/``,
``diffusers/``, ``loras/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import host

KINDS = ("diffusion_models", "text_encoders", "vae", "diffusers", "loras")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SAFETENSORS_SUFFIX = ".safetensors"
_MAX_LISTED = 20

_models_dir: Path | None = None


def set_models_dir(path: str | os.PathLike | None) -> None:
    """Use ``path`` (laid out like ComfyUI's ``models/``) when ComfyUI is absent; None unsets it."""
    global _models_dir
    _models_dir = None if path is None else Path(path).expanduser().resolve()


def models_dir() -> Path | None:
    """The models dir set by :func:`set_models_dir`, or None."""
    return _models_dir


def _folder_paths():
    """ComfyUI's ``folder_paths`` module, or None outside ComfyUI.

    A models dir set explicitly wins, so tests and the CLI behave the same whether or not a
    ``folder_paths`` module happens to be importable.
    """
    if _models_dir is not None:
        return None
    return host.folder_paths()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not a model folder; allowed: {', '.join(KINDS)}")


def search_dirs(kind: str) -> list[Path]:
    """The folders that hold models of ``kind`` (ComfyUI may configure several)."""
    _check_kind(kind)
    fp = _folder_paths()
    if fp is not None:
        try:
            return [Path(p) for p in fp.get_folder_paths(kind)]
        except KeyError:
            return []
    if _models_dir is None:
        return []
    return [_models_dir / kind]


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _list_diffusers(dirs: list[Path]) -> list[str]:
    """Folders (up to two levels deep) that hold a ``model_index.json``."""
    found: set[str] = set()
    for base in dirs:
        if not base.is_dir():
            continue
        for child in sorted(base.iterdir()):
            if not child.is_dir():
                continue
            if _is_diffusers_folder(child):
                found.add(child.name)
                continue
            for grandchild in sorted(child.iterdir()):
                if grandchild.is_dir() and _is_diffusers_folder(grandchild):
                    found.add(f"{child.name}/{grandchild.name}")
    return sorted(found)


def list_models(kind: str) -> list[str]:
    """Names a loader combo offers for ``kind``: ``.safetensors`` files, or diffusers folders.

    Pickle files in the same folders are not offered (they would be refused anyway).
    """
    _check_kind(kind)
    if kind == "diffusers":
        return _list_diffusers(search_dirs(kind))
    fp = _folder_paths()
    if fp is not None:
        names = fp.get_filename_list(kind)
    else:
        names = []
        for base in search_dirs(kind):
            if base.is_dir():
                names.extend(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
    return sorted({n for n in names if n.lower().endswith(SAFETENSORS_SUFFIX)})


def _available(kind: str) -> str:
    names = list_models(kind)
    if not names:
        where = ", ".join(str(d) for d in search_dirs(kind)) or "no folder configured"
        return f"nothing is there ({where})"
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"available: {shown}{more}"


def _check_name(kind: str, name: object, field: str) -> str:
    """Refuse anything but a plain relative name inside the model folder."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{field}: expected a model name from {kind}/, got {name!r}; {_available(kind)}")
    normalized = name.replace("\\", "/")
    parts = normalized.split("/")
    if normalized.startswith("/") or os.path.isabs(name) or ".." in parts or (parts and ":" in parts[0]):
        raise ValueError(
            f"{field}: {name!r} is not a name inside {kind}/ (absolute paths and '..' are refused); "
            f"{_available(kind)}"
        )
    return normalized


def _check_suffix(kind: str, name: str, field: str) -> None:
    lower = name.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise ValueError(
            f"{field}: {name!r} is a pickle checkpoint; only .safetensors files are loaded "
            "(pickle files can run code when opened). Convert it to .safetensors first."
        )
    if not lower.endswith(SAFETENSORS_SUFFIX):
        raise ValueError(f"{field}: {name!r} is not a .safetensors file; only .safetensors files are loaded")


def _inside(base: Path, candidate: Path) -> bool:
    """True when ``candidate`` (not resolved, so symlinked model files still work) is under ``base``."""
    base_s = os.path.normpath(os.path.abspath(base))
    cand_s = os.path.normpath(os.path.abspath(candidate))
    return os.path.commonpath([base_s, cand_s]) == base_s


def resolve_model(kind: str, name: object, field: str | None = None) -> Path:
    """The path of model ``name`` in folder ``kind``; a clear ``ValueError`` otherwise.

    Args:
        kind: one of :data:`KINDS`.
        name: the widget value (a file name relative to the folder, or a diffusers folder name).
        field: the input's name for error messages (defaults to ``kind``).
    """
    _check_kind(kind)
    field = field or kind
    clean = _check_name(kind, name, field)
    if kind != "diffusers":
        _check_suffix(kind, clean, field)
    dirs = search_dirs(kind)
    if not dirs:
        raise ValueError(
            f"{field}: cannot look up {clean!r}: no models directory is set; inside ComfyUI this uses "
            "ComfyUI's model folders, outside pass --models-dir (a folder laid out like ComfyUI's models/)"
        )
    for base in dirs:
        candidate = base / clean
        if not _inside(base, candidate):
            continue
        if kind == "diffusers":
            if candidate.is_dir() and _is_diffusers_folder(candidate):
                return candidate
        elif candidate.is_file():
            return candidate
    what = "diffusers folder (with model_index.json)" if kind == "diffusers" else "file"
    raise ValueError(f"{field}: {what} {clean!r} not found in {kind}/; {_available(kind)}")
