"""Regional ``torch.compile``: each transformer block class compiled once, reused by all.

HiDream has 16 double and 32 single blocks of two classes. Compiling the whole model
traces 48 blocks and recompiles whenever a cache skips some of them; compiling each block
*call* instead (as diffusers' ``compile_repeated_blocks`` does) traces one graph per block
class, shared by every block of that class because dynamo passes a module's parameters as
graph inputs instead of baking them in. A cache that skips blocks only calls fewer of them,
so nothing recompiles; a LoRA stage switch changes PEFT's adapter flags and scales, which
dynamo guards on, so each distinct LoRA state compiles once per block class (bounded by the
number of stages; the count is logged after every sampling call).

Nothing is changed on the shared transformer: the runner calls ``compiled_call(block,
...)`` instead of ``block(...)``. Where compile cannot run (no ``torch.compile``, no C++
compiler for inductor on the CPU, no Triton on CUDA, or a compile that fails), blocks run
eagerly and one warning says why.
"""

from __future__ import annotations

import logging
import shutil
import types
from collections.abc import Callable

import torch

from ..limits.check import check_choice

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "blocks")
BACKEND = "inductor"  # tests use "eager": dynamo's graphs, guards and recompiles are the same
# One compiled callable per (backend, block class) per process. dynamo keeps its compiled graphs
# on the code object it traces, so these must outlive any runner, or every call would recompile.
_COMPILED: dict[tuple[str, str], Callable] = {}
_WARNED: set[str] = set()


def check_compile(value: object) -> str:
    """Validate the loader's ``compile`` option."""
    return check_choice("compile", value, COMPILE_MODES)


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why regional compile cannot run on ``device`` here, or None when it can."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo as dynamo
    except ImportError as exc:
        return f"torch._dynamo does not import ({exc})"
    if not dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    kind = torch.device(device).type
    if kind == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor needs Triton on CUDA and it is not installed"
    if kind == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            compiler = get_cpp_compiler()
        except Exception as exc:  # inductor raises various errors when no compiler is found
            return f"inductor finds no C++ compiler for the CPU ({exc})"
        return None if shutil.which(compiler) else f"inductor's C++ compiler {compiler!r} is not on PATH"
    return f"regional compile is not supported on {kind!r} devices"


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("compile=blocks: running the blocks eagerly instead: %s", reason)


def _run_block(block: torch.nn.Module, kwargs: dict) -> object:
    return block(**kwargs)


def _compiled(block: torch.nn.Module) -> Callable:
    """The compiled callable for ``block``'s class; a new size compiles once more, then dynamic.

    Each class gets its own copy of ``_run_block``'s code object, so dynamo's per-code-object
    recompile limit (8) and its logs apply per block class rather than to both together.
    """
    inner = getattr(block, "block", block)  # diffusers and ComfyUI wrap both kinds in a ``HiDreamBlock``
    name = type(inner).__name__
    key = (BACKEND, f"{type(inner).__module__}.{name}")  # diffusers' and ComfyUI's share class names
    if key not in _COMPILED:
        code = _run_block.__code__.replace(co_name=f"run_{name}")
        fn = types.FunctionType(code, _run_block.__globals__, f"run_{name}")
        _COMPILED[key] = torch.compile(fn, backend=BACKEND)
    return _COMPILED[key]


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo.exc import TorchDynamoException

    errors: list[type[BaseException]] = [TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


def graph_count() -> int:
    """Graphs dynamo has compiled in this process (for the per-call recompile log)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


class BlockCaller:
    """Calls a block eagerly or through the shared compiled callable.

    With ``mode="blocks"`` availability is checked at the first call, on the device of the
    block's input (an offloaded model is still on the CPU when the runner is built). A compile
    that fails warns once and turns this caller eager; the failed call is rerun eagerly, which
    is safe because blocks do not modify their inputs.
    """

    def __init__(self, mode: str = "off") -> None:
        self.mode = check_compile(mode)
        self.compiled: bool | None = None if self.mode == "blocks" else False

    def __call__(self, block: torch.nn.Module, **kwargs) -> object:
        if self.compiled is None:
            first = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            reason = unavailable_reason(first.device)
            self.compiled = reason is None
            if reason is not None:
                _warn_once(reason)
        if not self.compiled:
            return block(**kwargs)
        try:
            return _compiled(block)(block, kwargs)
        except _compile_errors() as exc:
            self.compiled = False
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            _warn_once(f"compiling {type(block).__name__} failed: {first}")
            return block(**kwargs)
