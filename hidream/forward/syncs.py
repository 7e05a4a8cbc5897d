"""Counting the operations that make the host wait for the device.

A host sync drains the GPU's queue: the CPU stops issuing kernels until the device has
caught up, and CUDA graphs / full-graph compilation cannot contain one. ``SyncCounter``
counts them in any code run inside it, on any device, so a CPU test can prove that a forward
would not stall a GPU. It is two modes in one: a ``TorchFunctionMode`` for the reads that are
Python-level calls (and on a CPU tensor reach no aten op at all), and a ``TorchDispatchMode``
for the aten ops. Counted, by name:

- reads of values into Python: ``item``, ``tolist``, ``__bool__`` / ``__float__`` /
  ``__int__`` / ``__index__`` (``if t:``, ``float(t)``), and ``cpu`` (always: on a GPU it is
  a device-to-host copy; on the CPU it is a no-op that marks the same place). The
  ``aten._local_scalar_dense`` under such a read is the same sync and not counted again;
  met on its own (from C++), it is counted;
- ops whose *output shape* depends on the data, which must read it first (``nonzero``,
  ``masked_select``, ``unique``, ``bincount`` (on CUDA it reads the maximum, minlength or not), ``repeat_interleave``
  with tensor repeats, indexing with a boolean mask) and ops that return a Python value
  computed from data (``equal``, ``is_nonzero``). On the CPU these do not stall, but on CUDA
  every one does; counting them here is what makes a CPU count valid for CUDA;
- copies from a non-CPU device to the CPU (``.to("cpu")``, ``copy_``).

``.numpy()`` needs a CPU tensor, so the sync is the ``cpu`` before it: not counted again.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "cpu"}

_ALWAYS = {
    "_local_scalar_dense",
    "equal",
    "is_nonzero",
    "nonzero",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "masked_scatter",
}


def _packet(func) -> str:
    return func._overloadpacket.__name__


def _is_sync(func, args, kwargs) -> bool:
    name = _packet(func)
    if name in _ALWAYS:
        return True
    if name == "bincount":  # on CUDA it reads the maximum first, even with a minlength
        return True
    if name == "repeat_interleave":  # tensor repeats: the output length is their sum
        repeats = args[0] if len(args) == 1 else args[1]
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_"):
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    if name in ("_to_copy", "copy_"):
        return _to_cpu(name, args, kwargs)
    return False


def _to_cpu(name: str, args, kwargs) -> bool:
    if name == "copy_":  # copy_(dst, src)
        dst, src = args[0], args[1]
        return isinstance(src, torch.Tensor) and dst.device.type == "cpu" and src.device.type != "cpu"
    target = kwargs.get("device")
    return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"


class _Reads(TorchFunctionMode):
    def __init__(self, owner: SyncCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in _READS:
            return func(*args, **kwargs)
        self.owner.ops[name] += 1
        self.owner.inside_read += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.owner.inside_read -= 1


class _Ops(TorchDispatchMode):
    def __init__(self, owner: SyncCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _packet(func)
        counted_above = self.owner.inside_read and name == "_local_scalar_dense"
        if not counted_above and _is_sync(func, args, kwargs):
            self.owner.ops[name] += 1
        return func(*args, **kwargs)


class SyncCounter:
    """``with SyncCounter() as c: ...`` then ``c.total`` and ``c.ops`` (name -> count)."""

    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self.inside_read = 0
        self._modes = (_Reads(self), _Ops(self))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __enter__(self) -> SyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
