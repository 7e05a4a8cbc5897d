"""Tokenizers for single-file text encoders (the files carry none).

- CLIP-L and CLIP-G: OpenAI's CLIP BPE vocabulary, shipped in ``assets/clip_tokenizer``
  (MIT; see the LICENSE there). Loaded with ``from_pretrained(dir)``: transformers 5's
  ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently builds a 3-token vocabulary.
- Llama 3.1: ``tokenizer.model`` (tiktoken) from the installed ``llama-models`` package
  (Llama 3 Community License, so it is read at run time and never copied into this repo),
  converted once per process to a fast tokenizer with Llama 3.1's special tokens.
- T5: no wheel ships it. Searched in this order: an explicit folder; ``t5_tokenizer/``
  next to the T5 file; ComfyUI's ``comfy/text_encoders/t5_tokenizer/``; any
  ``models/diffusers/*/tokenizer_3/``. A candidate whose vocabulary does not fit the
  encoder's embedding table is skipped (a tiny test tokenizer must never drive the real
  T5, nor the real tokenizer a tiny T5).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .. import host

ASSETS = Path(__file__).resolve().parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"

LLAMA_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA_BOS = "<|begin_of_text|>"
LLAMA_EOT = "<|eot_id|>"
LLAMA_MAX_LENGTH = 131072
T5_VOCAB_SLACK = 256
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def llama_special_tokens() -> list[str]:
    """Llama 3.1's 256 special tokens, in id order from 128000 (Hugging Face naming)."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    return named + [f"<|reserved_special_token_{3 + i}|>" for i in range(256 - len(named))]


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The CLIP BPE tokenizer (shared by CLIP-L and CLIP-G, as in HiDream's diffusers folders)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))


def llama_tokenizer_model_path() -> Path:
    """``tokenizer.model`` of Llama 3 inside the installed ``llama-models`` package."""
    try:
        import llama_models
    except ImportError as exc:
        raise ValueError(
            "llama: the Llama 3 tokenizer comes from the 'llama-models' package, which is not installed; "
            "run: pip install llama-models"
        ) from exc
    path = Path(llama_models.__file__).resolve().parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise ValueError(f"llama: the llama-models package has no Llama 3 tokenizer at {path}; reinstall it")
    return path


@lru_cache(maxsize=1)
def llama_tokenizer():
    """Llama 3.1 Instruct's tokenizer as a ``PreTrainedTokenizerFast`` (about 2 s, once)."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(llama_tokenizer_model_path()),
        pattern=LLAMA_PATTERN,
        # transformers 4.x iterates this list (None fails); 5.x takes it as an unused keyword.
        # The special tokens are added below, with the ids Llama 3 gives them.
        additional_special_tokens=[],
    ).converted()
    base = backend.get_vocab_size()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in llama_special_tokens()]
    )
    bos_id = backend.token_to_id(LLAMA_BOS)
    if bos_id != base or backend.token_to_id(LLAMA_EOT) != base + 9:
        raise RuntimeError("llama: unexpected special-token ids after conversion")
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{LLAMA_BOS}:0 $A:0",
                pair=f"{LLAMA_BOS}:0 $A:0 {LLAMA_BOS}:1 $B:1",
                special_tokens=[(LLAMA_BOS, bos_id)],
            ),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=LLAMA_BOS,
        eos_token=LLAMA_EOT,
        model_max_length=LLAMA_MAX_LENGTH,
        clean_up_tokenization_spaces=True,
    )
    tok.pad_token = tok.eos_token  # what HiDreamImagePipeline sets
    return tok


def _comfy_t5_dir() -> Path | None:
    """ComfyUI's ``comfy/text_encoders/t5_tokenizer``, when running inside ComfyUI.

    ``comfy.text_encoders`` has no ``__init__.py`` (a namespace package), so its ``__file__``
    is None: the folder is found through the package's ``__path__`` entries instead.
    """
    package = host.text_encoders_package()
    return package_subdir(package, "t5_tokenizer") if package is not None else None


def package_subdir(package: object, name: str) -> Path | None:
    """``<package folder>/<name>`` for a regular or a namespace package, if it exists."""
    roots = list(getattr(package, "__path__", None) or [])
    origin = getattr(package, "__file__", None)
    if origin:
        roots.insert(0, str(Path(origin).parent))
    for root in roots:
        candidate = Path(root).resolve() / name
        if candidate.is_dir():
            return candidate
    return None


def t5_candidates(t5_path: Path, explicit: str | Path | None) -> list[Path]:
    """Folders that may hold the T5 tokenizer, in search order."""
    from .paths import search_dirs

    out: list[Path] = []
    if explicit:
        out.append(Path(explicit))
    out.append(Path(t5_path).parent / "t5_tokenizer")
    comfy_dir = _comfy_t5_dir()
    if comfy_dir is not None:
        out.append(comfy_dir)
    for base in search_dirs("diffusers"):
        if base.is_dir():
            out.extend(sorted(p / "tokenizer_3" for p in base.iterdir() if (p / "tokenizer_3").is_dir()))
    return out


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in T5_TOKENIZER_FILES)


def load_t5_tokenizer(t5_path: Path, vocab_rows: int, explicit: str | Path | None = None):
    """The first T5 tokenizer found (see module docstring) that fits ``vocab_rows`` embeddings."""
    from transformers import AutoTokenizer

    if explicit and not _has_tokenizer(Path(explicit)):
        raise ValueError(
            f"t5_tokenizer_dir: {str(explicit)!r} holds no T5 tokenizer (tokenizer.json or spiece.model)"
        )
    skipped: list[str] = []
    for folder in t5_candidates(t5_path, explicit):
        if not _has_tokenizer(folder):
            continue
        tok = AutoTokenizer.from_pretrained(str(folder))
        if vocab_rows - T5_VOCAB_SLACK < len(tok) <= vocab_rows:
            return tok
        skipped.append(f"{folder} ({len(tok)} tokens)")
    note = (
        f" Skipped (vocabulary does not fit the encoder's {vocab_rows} rows): {'; '.join(skipped)}."
        if skipped
        else ""
    )
    raise ValueError(
        f"t5: no T5 tokenizer found for {Path(t5_path).name!r}. Put T5-XXL's tokenizer files "
        f"(tokenizer.json, tokenizer_config.json) in {Path(t5_path).parent / 't5_tokenizer'}, or keep a "
        "diffusers HiDream folder with tokenizer_3/ under models/diffusers/ (inside ComfyUI, ComfyUI's own "
        f"comfy/text_encoders/t5_tokenizer is used).{note}"
    )
