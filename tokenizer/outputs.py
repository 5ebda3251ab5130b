"""NamedOutput: the base of the models' named outputs.

A dataclass that is also a dict. DeepSpeed ZeRO-3 attaches its backward hooks by walking
a module's outputs, and it only looks inside tuples, lists and dicts: the tensors of a
plain dataclass would be invisible to it, and its parameter release would fail in the
backward pass. Fields read as attributes (`out.indices`), as in any dataclass.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any


class NamedOutput(dict):
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        dict.__setitem__(self, name, value)

    def __setitem__(self, name: str, value: Any) -> None:
        # DeepSpeed writes hooked tensors back through the dict interface.
        if name not in {f.name for f in fields(self)}:
            raise KeyError(f"{type(self).__name__} has no field {name!r}")
        super().__setattr__(name, value)
        dict.__setitem__(self, name, value)

    def __reduce__(self):
        # Pickle (DataLoader workers, multiprocessing) through the dataclass constructor.
        return (type(self), tuple(getattr(self, f.name) for f in fields(self)))
