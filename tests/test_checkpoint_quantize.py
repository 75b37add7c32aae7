"""Quantized checkpoints (``--checkpoint-quantize``): a row restores within the rounding its scale
and offset allow, derived from the arithmetic; codes pack and unpack exactly; a chain written in 8
bits restores every other entry bit for bit; each restore from quantized rows doubles the bits."""
import copy
import math

import pytest
import torch

from dlrm.checkpoints.chain import CheckpointChain, load_chain
from dlrm.checkpoints.increments import TouchedRows, increment_bytes, table_keys
from dlrm.checkpoints.quantize import (dequantize_rows, quantize_rows, quantize_tables, widened_bits,
                                       written_bytes)
from helpers.chain_models import CONFIG, SIZES, assert_same, payload_at, small_run, train_step

FP16_REL = 2.0 ** -11  # float16's relative rounding (round to nearest, 10 stored bits)
FP16_SUB = 2.0 ** -25  # half of float16's smallest subnormal step: the absolute rounding near zero


def _bound(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """The most a value of each row may move: half a step of the stored scale, the rounding of the
    offset to float16, the levels times the rounding of the scale, and float32's own rounding."""
    levels = (1 << bits) - 1
    low, high = rows.min(dim=1).values.double(), rows.max(dim=1).values.double()
    exact_scale = (high - low) / levels
    stored_scale = exact_scale * (1 + FP16_REL) + FP16_SUB
    offset_error = low.abs() * FP16_REL + FP16_SUB
    scale_error = levels * (exact_scale * FP16_REL + FP16_SUB)
    float32 = 4 * 2.0 ** -24 * (rows.abs().max(dim=1).values.double() + high - low + 1e-30)
    return stored_scale / 2 + offset_error + scale_error + float32


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim", [16, 5])
def test_rows_restore_within_the_rounding_their_scale_and_offset_allow(bits, dim):
    gen = torch.Generator().manual_seed(bits * 10 + dim)
    rows = torch.cat([torch.randn(200, dim, generator=gen) * 0.05,
                      torch.randn(50, dim, generator=gen) * 30 + 100,  # large offsets
                      torch.full((3, dim), -0.25),  # constant rows: a zero scale
                      torch.rand(20, dim, generator=gen) * 1e-6])  # tiny ranges
    quantized = quantize_rows(rows, bits)
    assert quantized["codes"].dtype == torch.uint8 and quantized["codes"].shape == (len(rows), math.ceil(dim * bits / 8))
    error = (dequantize_rows(quantized) - rows).abs().double().max(dim=1).values
    assert (error <= _bound(rows, bits)).all(), (error - _bound(rows, bits)).max()
    assert torch.equal(dequantize_rows(quantize_rows(rows[250:253], bits)), rows[250:253])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_codes_pack_and_unpack_exactly(bits):
    """Rows spanning 0 to the top code have scale 1 and offset 0 exactly: every code comes back."""
    levels = (1 << bits) - 1
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, levels + 1, (64, 7), generator=gen).float()
    codes[:, 0], codes[:, 1] = 0, levels
    assert torch.equal(dequantize_rows(quantize_rows(codes, bits)), codes)
    assert dequantize_rows(quantize_rows(torch.empty(0, 7), bits)).shape == (0, 7)


def test_only_8_4_and_2_bits():
    with pytest.raises(ValueError, match="cannot quantize to 3 bits: 8, 4, 2 only"):
        quantize_rows(torch.zeros(2, 4), 3)


def test_each_restore_from_quantized_rows_doubles_the_bits_until_exact():
    assert [widened_bits(2, k) for k in range(4)] == [2, 4, 8, None]
    assert [widened_bits(8, k) for k in range(2)] == [8, None]
    assert widened_bits(None, 0) is None


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_a_chain_in_8_bits_rounds_the_tables_only(tmp_path, optimizer):
    model, opt, schedule, batches = small_run(tmp_path, optimizer)
    names = [n for n, _ in model.named_parameters()]
    chain = CheckpointChain(str(tmp_path / "q"), CONFIG, rebase_fraction=10.0, bits=8)
    touched = TouchedRows(SIZES)
    for step, batch in enumerate(batches[:4], start=1):
        train_step(model, opt, schedule, batch)
        touched.add(batch.indices)
        link = chain.save(payload_at(model, opt, optimizer, schedule, step), touched.take(), names)
        assert link.bits == 8
    exact = payload_at(model, opt, optimizer, schedule, 4)
    restored = load_chain(chain.directory)
    tables = table_keys(exact["state_dict"])
    assert list(restored["state_dict"]) == list(exact["state_dict"])  # the reference's key order
    for key in tables:
        ours, theirs = restored["state_dict"].pop(key), exact["state_dict"].pop(key)
        assert ((ours - theirs).abs().double().max(dim=1).values <= _bound(theirs, 8)).all(), key
    assert_same(restored, exact)  # optimizer state, MLPs, schedule and position: exact


def test_the_bytes_counted_are_the_bytes_written():
    rows = torch.randn(100, 16)
    checkpoint = {"state_dict": {"emb_l.0.weight": rows.clone(), "bot_l.0.weight": torch.randn(4, 3)},
                  "rows": {"emb_l.0.weight": {"rows": torch.arange(5), "values": rows[:5].clone()}}}
    for bits in (8, 4, 2):
        expected = written_bytes(checkpoint, bits)
        assert increment_bytes(quantize_tables(copy.deepcopy(checkpoint), bits)) == expected
    assert written_bytes(checkpoint, 8) == 100 * 20 + 48 + 5 * 8 + 5 * 20  # 8 bits at dim 16: 20 bytes a row
    assert written_bytes(checkpoint, None) == increment_bytes(checkpoint)
