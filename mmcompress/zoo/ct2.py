"""Reader of CTranslate2 ``model.bin`` files (binary format version >= 5) into numpy arrays.

Layout (little endian): ``u32 version``, ``str spec``, ``u32 spec_revision``, ``u32 n_vars``, then per variable
``str name, u8 rank, u32 dims[rank], u8 dtype, u32 nbytes, bytes``, then optionally ``u32 n_aliases`` and
``(str alias, str target)`` pairs. ``str`` = ``u16 length`` (including a trailing NUL) + bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["CT2Model", "read_ct2"]

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BFLOAT16 = 5


@dataclass
class CT2Model:
    """Contents of a CTranslate2 model file."""

    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        """Return a variable by name, following aliases.

        Raises:
            KeyError: If the variable does not exist.
        """
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise KeyError(f"variable {name!r} not in CTranslate2 model (spec {self.spec!r})")
        return self.variables[name]


def read_ct2(path: str | Path) -> CT2Model:
    """Parse a CTranslate2 ``model.bin``.

    Args:
        path: File path.

    Returns:
        The parsed model; arrays keep their stored dtype (bfloat16 is widened to float32).

    Raises:
        ValueError: If the file is not a supported CTranslate2 model.
    """
    buf = Path(path).read_bytes()
    off = 0

    def unpack(fmt: str) -> int:
        nonlocal off
        (v,) = struct.unpack_from(fmt, buf, off)
        off += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal off
        n = unpack("<H")
        s = buf[off : off + n - 1].decode("utf-8")
        off += n
        return s

    version = unpack("<I")
    if version < 5:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported (need >= 5)")
    model = CT2Model(version=version, spec=string(), revision=unpack("<I"))
    for _ in range(unpack("<I")):
        name = string()
        rank = unpack("<B")
        dims = [unpack("<I") for _ in range(rank)]
        dtype = unpack("<B")
        nbytes = unpack("<I")
        if dtype == _BFLOAT16:
            raw = np.frombuffer(buf, np.uint16, nbytes // 2, off).astype(np.uint32) << 16
            arr = raw.view(np.float32)
        elif dtype in _DTYPES:
            dt = np.dtype(_DTYPES[dtype])
            arr = np.frombuffer(buf, dt, nbytes // dt.itemsize, off)
        else:
            raise ValueError(f"{path}: unknown dtype code {dtype} for variable {name!r}")
        model.variables[name] = arr.reshape(dims)
        off += nbytes
    if off < len(buf):
        for _ in range(unpack("<I")):
            alias = string()
            model.aliases[alias] = string()
    return model
