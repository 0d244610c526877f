"""A cheap, generic copy of a running simulation's mutable state (for lookahead planning).

``copy.deepcopy`` would copy everything reachable, profiles and workload arrays included, and is slow. This
copier walks the same graph but:

* shares every object it is told is immutable (profiles, config, workload arrays) and every atomic value;
* copies objects generically, attribute by attribute (``__dict__`` and ``__slots__``), so attributes added to
  the node classes later (a prefix cache, ...) are picked up without touching this file;
* copies the mutable containers (list, tuple, deque, dict, set, ``array``, numpy arrays) element-wise;
* re-binds bound methods (event handlers on the heap, node callbacks) to the copy of their object, so the
  copied heap calls the copied nodes;
* keeps identity: an object reached twice (a request in a queue and on the heap) is copied once.

An object of a type it does not know how to copy is an error naming the type.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Iterable
from types import BuiltinFunctionType, FunctionType, MethodType
from typing import Any

import numpy as np

_ATOMIC = frozenset({int, float, bool, str, bytes, complex, type(None), FunctionType, BuiltinFunctionType, type,
                     range})


def _slots_of(cls: type) -> tuple[str, ...]:
    names: list[str] = []
    for k in cls.__mro__:
        s = k.__dict__.get("__slots__", ())
        names.extend((s,) if isinstance(s, str) else s)
    return tuple(n for n in names if n not in ("__dict__", "__weakref__"))


class StateCopier:
    """Copies object graphs, sharing ``shared`` objects and atomic values; one instance per snapshot."""

    def __init__(self, shared: Iterable[object] = ()) -> None:
        self.memo: dict[int, Any] = {id(o): o for o in shared}
        self._slots: dict[type, tuple[str, ...]] = {}

    def copy(self, x: Any) -> Any:
        t = type(x)
        if t in _ATOMIC:
            return x
        got = self.memo.get(id(x), _MISSING)
        if got is not _MISSING:
            return got
        fn = _DISPATCH.get(t)
        if fn is not None:
            return fn(self, x)
        return self._object(x)

    def _list(self, x: list) -> list:
        new: list = []
        self.memo[id(x)] = new
        cp = self.copy
        new.extend([cp(e) for e in x])
        return new

    def _tuple(self, x: tuple) -> tuple:
        cp = self.copy
        new = tuple([cp(e) for e in x])
        self.memo[id(x)] = new
        return new

    def _deque(self, x: deque) -> deque:
        new: deque = deque(maxlen=x.maxlen)
        self.memo[id(x)] = new
        cp = self.copy
        new.extend([cp(e) for e in x])
        return new

    def _dict(self, x: dict) -> dict:
        new: dict = type(x)() if type(x) is not dict else {}
        self.memo[id(x)] = new
        cp = self.copy
        for k, v in x.items():
            new[cp(k)] = cp(v)
        return new

    def _set(self, x: set) -> set:
        new = {self.copy(e) for e in x}
        self.memo[id(x)] = new
        return new

    def _array(self, x: array) -> array:
        new = x[:]
        self.memo[id(x)] = new
        return new

    def _ndarray(self, x: np.ndarray) -> np.ndarray:
        new = x.copy()
        self.memo[id(x)] = new
        return new

    def _method(self, x: MethodType) -> MethodType:
        return MethodType(x.__func__, self.copy(x.__self__))

    def _object(self, x: Any) -> Any:
        cls = type(x)
        d = getattr(x, "__dict__", None)
        slots = self._slots.get(cls)
        if slots is None:
            slots = self._slots[cls] = _slots_of(cls)
        if d is None and not slots:
            raise TypeError(f"state copy: cannot copy an object of type {cls.__module__}.{cls.__qualname__} "
                            "(no __dict__ or __slots__); share it if it is immutable")
        new = object.__new__(cls)
        self.memo[id(x)] = new
        cp = self.copy
        atomic = _ATOMIC
        setattr_ = object.__setattr__
        for name in slots:
            try:
                v = getattr(x, name)
            except AttributeError:
                continue
            setattr_(new, name, v if type(v) in atomic else cp(v))
        if d is not None:
            nd = new.__dict__
            for k, v in d.items():
                nd[k] = v if type(v) in atomic else cp(v)
        return new


_MISSING = object()
_DISPATCH = {
    list: StateCopier._list, tuple: StateCopier._tuple, deque: StateCopier._deque, dict: StateCopier._dict,
    set: StateCopier._set, frozenset: lambda s, x: x if all(type(e) in _ATOMIC for e in x) else s._set(x),
    array: StateCopier._array, np.ndarray: StateCopier._ndarray, MethodType: StateCopier._method,
}
