"""Quantized checkpoints (``--checkpoint-quantize``): table rows in 8, 4 or 2 bits, with a scale and
an offset per row.

A row x of D values is written as codes c in [0, 2^b - 1] with ``x ~ offset + c * scale``, where
offset is the row's minimum and scale its range over 2^b - 1, both stored as float16 and used as
rounded (so the codes are those of the stored scale and offset). A value then restores within
``scale / 2`` of itself, plus the float16 rounding of offset and scale (a relative 2^-11 each).
Codes are packed 8 / b to a byte, the first in the lowest bits; a row's D codes are padded to a
whole byte with zeros.

Bytes per row: ``ceil(D * b / 8) + 4`` against ``4 D`` exact: at D = 16, 20 bytes in 8 bits (3.2x
less), 12 in 4 bits (5.3x), 8 in 2 bits (8x).

Only the tables' weights are quantized; optimizer state, dense parameters and positions stay exact.

Dimension vocabulary: n rows, D values a row, P packed bytes a row.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from dlrm.checkpoints.increments import increment_bytes, table_keys

BITS = (8, 4, 2)


def quantize_rows(values: torch.Tensor, bits: int) -> Dict[str, torch.Tensor]:
    """The quantized form of ``values`` (n, D) float: ``codes`` (n, P) uint8, ``scale`` and
    ``offset`` (n,) float16, ``dim`` D and ``bits``."""
    if bits not in BITS:
        raise ValueError(f"cannot quantize to {bits} bits: {', '.join(map(str, BITS))} only")
    values = values.detach().float()
    n, dim = values.shape
    levels = (1 << bits) - 1
    if n == 0:
        low = high = values.new_zeros(0)
    else:
        low, high = values.min(dim=1).values, values.max(dim=1).values
    offset = low.half()
    scale = ((high - low) / levels).half()
    step = scale.float().unsqueeze(1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((values - offset.float().unsqueeze(1)) / safe).round_().clamp_(0, levels)
    codes = torch.where(step > 0, codes, torch.zeros_like(codes)).to(torch.uint8)
    return {"codes": _pack(codes, bits), "scale": scale, "offset": offset,
            "dim": dim, "bits": bits}


def dequantize_rows(quantized: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The (n, D) float32 rows that :func:`quantize_rows` wrote."""
    bits, dim = int(quantized["bits"]), int(quantized["dim"])
    codes = _unpack(quantized["codes"], bits, dim).float()
    return quantized["offset"].float().unsqueeze(1) + codes * quantized["scale"].float().unsqueeze(1)


def widened_bits(bits: Optional[int], restores: int) -> Optional[int]:
    """The bits to write after ``restores`` restores from quantized checkpoints in the run's
    lineage: twice as many per restore, exact (None) once past 8.

    Rounding enters the model only when a checkpoint is restored (every increment holds the rows'
    values, not changes, so a chain's increments do not add their errors up). A run restored from
    a quantized chain carries that rounding in every row it does not train again, and a second
    restore would round those rows once more; writing the next checkpoints in more bits keeps the
    sum of the roundings near the first one's.
    """
    if bits is None:
        return None
    widened = bits << restores
    return widened if widened <= 8 else None


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    n, dim = codes.shape
    padded = -(-dim // per_byte) * per_byte
    if padded != dim:
        codes = torch.cat([codes, codes.new_zeros(n, padded - dim)], dim=1)
    grouped = codes.view(n, padded // per_byte, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (grouped << shifts).sum(dim=2).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(2) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], packed.shape[1] * per_byte)[:, :dim].to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# A checkpoint's tables (a base's ``state_dict`` entries, an increment's ``rows``)
# ---------------------------------------------------------------------------------------------


def quantize_tables(checkpoint: Dict[str, Any], bits: int) -> Dict[str, Any]:
    """``checkpoint`` (a base or an increment, changed in place and returned) with its tables'
    rows quantized: a base's tables move from ``state_dict`` to ``quantized`` (``state_order``
    keeps the keys' order), an increment's ``rows[key]["values"]`` become ``rows[key]["quantized"]``."""
    state = checkpoint["state_dict"]
    tables = table_keys(state)
    if tables:
        checkpoint["state_order"] = list(state)
        checkpoint["quantized"] = {key: quantize_rows(state.pop(key), bits) for key in tables}
    for piece in checkpoint.get("rows", {}).values():
        piece["quantized"] = quantize_rows(piece.pop("values"), bits)
    return checkpoint


def dequantize_tables(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`quantize_tables` (in place): float32 rows where codes were."""
    quantized = checkpoint.pop("quantized", None)
    if quantized is not None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {key: dequantize_rows(quantized[key]) if key in quantized else state[key]
                                    for key in checkpoint.pop("state_order")}
    for piece in checkpoint.get("rows", {}).values():
        if "quantized" in piece:
            piece["values"] = dequantize_rows(piece.pop("quantized"))
    return checkpoint


def written_bytes(checkpoint: Dict[str, Any], bits: Optional[int]) -> int:
    """The tensor bytes ``checkpoint`` (a base or an increment, its tables exact) takes written
    with its tables in ``bits`` (None: exact)."""
    total = increment_bytes(checkpoint)
    if bits is None:
        return total
    state = checkpoint["state_dict"]
    tables = [state[key] for key in table_keys(state)] + [p["values"] for p in checkpoint.get("rows", {}).values()]
    for rows in tables:
        total += rows.shape[0] * (-(-rows.shape[1] * bits // 8) + 4) - rows.numel() * rows.element_size()
    return total
