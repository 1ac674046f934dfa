"""bfloat16 as a zarr v3 data type for zarr-python 3.1.

zarr v3 names the type ``"bfloat16"`` (zarr-extensions); tensorstore reads and writes it natively, zarr-python 3.1
ships no wrapper for it. This module defines one (a ``ZDType`` over ``ml_dtypes.bfloat16``) and registers it in
zarr's data-type registry, so arrays are stored as real bfloat16 (2 bytes/element, no up-cast) and read back as
``ml_dtypes.bfloat16`` numpy arrays.

Only zarr format 3 is supported: zarr v2 has no bfloat16 type name. Fill values follow the v3 float rules: a JSON
number, ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, or ``"0x"`` + 4 hex digits giving the raw bf16 bits.

Call :func:`register_bfloat16` (idempotent) before creating or opening arrays; importing ``openpi.latents.store``
(or any of its modules that touch zarr arrays) does it for you.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import ClassVar, Literal

import ml_dtypes
import numpy as np
from zarr.core.dtype import ZDType, data_type_registry
from zarr.core.dtype.common import DataTypeValidationError, HasEndianness, HasItemSize

BF16 = np.dtype(ml_dtypes.bfloat16)
_BF16_DTYPE_CLS = type(BF16)
_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_V2_ERROR = "bfloat16 has no zarr v2 encoding; create the array with zarr_format=3."


def _endianness_of(dtype: np.dtype) -> Literal["little", "big"]:
    order = dtype.byteorder
    if order in ("=", "|"):
        return sys.byteorder  # type: ignore[return-value]
    return "little" if order == "<" else "big"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BFloat16(ZDType[_BF16_DTYPE_CLS, ml_dtypes.bfloat16], HasEndianness, HasItemSize):  # type: ignore[type-var]
    """zarr v3 ``bfloat16`` backed by ``ml_dtypes.bfloat16``."""

    dtype_cls: ClassVar[type] = _BF16_DTYPE_CLS
    _zarr_v3_name: ClassVar[str] = "bfloat16"

    @property
    def item_size(self) -> int:
        return 2

    # --- native dtype <-> wrapper ---------------------------------------------------------------
    @classmethod
    def from_native_dtype(cls, dtype: np.dtype) -> BFloat16:
        if isinstance(dtype, _BF16_DTYPE_CLS):
            return cls(endianness=_endianness_of(dtype))
        raise DataTypeValidationError(f"Invalid data type: {dtype}. Expected ml_dtypes.bfloat16.")

    def to_native_dtype(self) -> np.dtype:
        return BF16.newbyteorder("<" if self.endianness == "little" else ">")

    # --- data type JSON ---------------------------------------------------------------------------
    @classmethod
    def _from_json_v2(cls, data: object) -> BFloat16:
        raise DataTypeValidationError(_V2_ERROR)

    @classmethod
    def _from_json_v3(cls, data: object) -> BFloat16:
        if data == cls._zarr_v3_name:
            return cls()
        raise DataTypeValidationError(f"Invalid JSON for BFloat16: {data!r}, expected 'bfloat16'.")

    def to_json(self, zarr_format: int) -> str:  # type: ignore[override]
        if zarr_format == 3:
            return self._zarr_v3_name
        raise ValueError(_V2_ERROR)

    # --- scalars ----------------------------------------------------------------------------------
    def _check_scalar(self, data: object) -> bool:
        if isinstance(data, str):
            return data in _SPECIAL
        return isinstance(data, (int, float, np.integer, np.floating, ml_dtypes.bfloat16))

    def cast_scalar(self, data: object) -> ml_dtypes.bfloat16:
        if not self._check_scalar(data):
            raise TypeError(f"Cannot convert {data!r} ({type(data).__name__}) to a bfloat16 scalar.")
        value = _SPECIAL[data] if isinstance(data, str) else data
        return ml_dtypes.bfloat16(value)

    def default_scalar(self) -> ml_dtypes.bfloat16:
        return ml_dtypes.bfloat16(0)

    def from_json_scalar(self, data: object, *, zarr_format: int) -> ml_dtypes.bfloat16:
        if zarr_format != 3:
            raise ValueError(_V2_ERROR)
        if isinstance(data, str):
            if data in _SPECIAL:
                return ml_dtypes.bfloat16(_SPECIAL[data])
            if data.startswith("0x") and len(data) == 6:
                return np.array([int(data, 16)], dtype=np.uint16).view(BF16)[0]
            raise TypeError(f"Invalid bfloat16 fill value {data!r}: use a number, 'NaN', '±Infinity' or '0xHHHH'.")
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return ml_dtypes.bfloat16(data)
        raise TypeError(f"Invalid bfloat16 fill value {data!r}.")

    def to_json_scalar(self, data: object, *, zarr_format: int) -> float | str:
        if zarr_format != 3:
            raise ValueError(_V2_ERROR)
        value = float(self.cast_scalar(data))
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value


def register_bfloat16() -> None:
    """Register :class:`BFloat16` in zarr's data-type registry (idempotent)."""
    data_type_registry.register(BFloat16._zarr_v3_name, BFloat16)


register_bfloat16()
