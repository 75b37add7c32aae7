"""The sharding planner (dlrm.shard.plan) against plain loops written here: the table-wise layout, block
coverage, whole-only tables, auto's balance on the MLPerf tables, the budget refusal and the printed plan."""
import random

import pytest

from bench import sharding_balance
from bench.harness import MLPERF_TABLE_SIZES
from dlrm.common import ConfigError
from dlrm.distributed import shard
from dlrm.shard.plan import (Placement, ShardingPlan, TableSpec, balance, format_plan, human_bytes, piece_bytes,
                             piece_lookups, plan_sharding, rank_list, rank_totals)

GIB = 2 ** 30
MLPERF_CAP = 4_000_000  # rows per table, as in bench/sharding_balance.py
OPTIMIZERS = ("sgd", "adagrad", "rwsadagrad")


def mlperf_specs(batch=2048):
    """The MLPerf (Criteo Terabyte) tables capped at MLPERF_CAP rows, dim 128, one lookup per sample."""
    return [TableSpec(min(rows, MLPERF_CAP), 128, float(batch)) for rows in MLPERF_TABLE_SIZES]


def random_specs(rng, count, whole_share=0.0):
    """``count`` tables of 1..12 rows (often fewer than the ranks) or up to 3000, dim 1..9."""
    return [TableSpec(rng.choice([rng.randint(1, 12), rng.randint(1, 3000)]), rng.randint(1, 9),
                      float(rng.randint(0, 500)), whole_only=rng.random() < whole_share)
            for _ in range(count)]


def plain_bytes(rows_held, cols_held, optimizer, learned_pooling):
    """Bytes of a piece by the brief's rule, written out case by case."""
    values = rows_held * cols_held
    if optimizer == "adagrad":
        values += rows_held * cols_held
    elif optimizer == "rwsadagrad":
        values += rows_held
    if learned_pooling:
        values += rows_held if optimizer == "sgd" else 2 * rows_held
    return 4 * values


def plain_totals(plan, specs, optimizer, learned_pooling):
    """Per rank (bytes, lookups) by a plain loop over every block."""
    totals = [[0, 0.0] for _ in range(plan.world_size)]
    for p in plan.placements:
        spec = specs[p.table]
        for rank, (start, stop) in zip(p.ranks, p.blocks):
            held = {"table": (spec.rows, spec.dim), "row": (stop - start, spec.dim),
                    "column": (spec.rows, stop - start)}[p.kind]
            share = {"table": 1.0, "row": (stop - start) / spec.rows, "column": (stop - start) / spec.dim}[p.kind]
            totals[rank][0] += plain_bytes(*held, optimizer, learned_pooling)
            totals[rank][1] += spec.lookups_per_step * share
    return totals


def worst_ratio(plan, specs, optimizer="sgd"):
    return max(balance(rank_totals(plan, specs, optimizer, False)))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 8])
def test_table_mode_is_the_reference_contiguous_shards(world_size):
    for num_tables in range(world_size, 12):
        specs = [TableSpec(10 + t, 4, 1.0) for t in range(num_tables)]
        plan = plan_sharding(specs, world_size, "table", None)
        assert [p.kind for p in plan.placements] == ["table"] * num_tables
        for rank in range(world_size):
            assert [p.table for p in plan.pieces_on(rank)] == list(range(*shard(num_tables, world_size, rank)))
        assert all(p.blocks == ((0, specs[p.table].rows),) for p in plan.placements)


def test_table_mode_refuses_fewer_tables_than_ranks():
    with pytest.raises(ConfigError, match="3 tables cannot be placed table-wise over 4 ranks"):
        plan_sharding([TableSpec(5, 2, 1.0)] * 3, 4, "table", None)


def check_cover(placement, spec, world_size):
    """Blocks ascending, contiguous, each non-empty, covering the rows (columns) once; owners distinct."""
    extent = spec.dim if placement.kind == "column" else spec.rows
    counts = [0] * extent
    for start, stop in placement.blocks:
        assert start < stop
        for i in range(start, stop):
            counts[i] += 1
    assert counts == [1] * extent
    assert [b[0] for b in placement.blocks] == [0] + [b[1] for b in placement.blocks[:-1]]
    assert len(set(placement.ranks)) == len(placement.ranks)
    assert all(0 <= r < world_size for r in placement.ranks)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("mode", ["table", "row", "column", "auto"])
def test_blocks_cover_every_row_and_column_once(world_size, mode):
    rng = random.Random(world_size * 10 + len(mode))
    for _ in range(20):
        specs = random_specs(rng, rng.randint(world_size, world_size + 6), whole_share=0.2)
        plan = plan_sharding(specs, world_size, mode, None, rng.choice(OPTIMIZERS), rng.random() < 0.5)
        assert plan.world_size == world_size and plan.mode == mode
        assert [p.table for p in plan.placements] == list(range(len(specs)))
        for p in plan.placements:
            check_cover(p, specs[p.table], world_size)


@pytest.mark.parametrize("mode", ["row", "column"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_row_and_column_blocks_follow_shard_from_the_table_number(mode, world_size):
    rng = random.Random(world_size)
    specs = random_specs(rng, 12)
    plan = plan_sharding(specs, world_size, mode, None)
    for t, (spec, p) in enumerate(zip(specs, plan.placements)):
        extent = spec.rows if mode == "row" else spec.dim
        k = min(extent, world_size)
        first = 0 if k == world_size else t % world_size
        assert p.kind == mode
        assert p.blocks == tuple(shard(extent, k, i) for i in range(k))
        assert p.ranks == tuple((first + i) % world_size for i in range(k))


def test_small_row_split_tables_spread_over_the_ranks():
    # 4 tables of 2 rows over 4 ranks: blocks on ranks (0,1), (1,2), (2,3), (3,0)
    plan = plan_sharding([TableSpec(2, 8, 10.0)] * 4, 4, "row", None)
    assert [p.ranks for p in plan.placements] == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert [len(plan.pieces_on(r)) for r in range(4)] == [2, 2, 2, 2]


@pytest.mark.parametrize("mode", ["row", "column", "auto"])
def test_whole_only_tables_stay_whole(mode):
    rng = random.Random(7)
    specs = random_specs(rng, 11, whole_share=0.5)
    assert any(s.whole_only for s in specs) and not all(s.whole_only for s in specs)
    plan = plan_sharding(specs, 3, mode, None, "adagrad")
    for t, (spec, p) in enumerate(zip(specs, plan.placements)):
        if spec.whole_only:
            assert p.kind == "table" and p.blocks == ((0, spec.rows),)
            if mode != "auto":  # on the rank the table-wise layout gives it
                assert shard(len(specs), 3, p.ranks[0])[0] <= t < shard(len(specs), 3, p.ranks[0])[1]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("learned_pooling", [False, True])
def test_auto_balances_the_mlperf_tables_over_4_ranks(optimizer, learned_pooling):
    specs = mlperf_specs()
    auto = plan_sharding(specs, 4, "auto", None, optimizer, learned_pooling)
    table_wise = plan_sharding(specs, 4, "table", None, optimizer, learned_pooling)
    auto_bytes, auto_lookups = balance(rank_totals(auto, specs, optimizer, learned_pooling))
    table_bytes, table_lookups = balance(rank_totals(table_wise, specs, optimizer, learned_pooling))
    assert auto_bytes <= 1.15 and auto_lookups <= 1.15
    assert max(auto_bytes, auto_lookups) < max(table_bytes, table_lookups)
    assert auto_bytes < table_bytes


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_auto_cuts_only_the_largest_tables(world_size):
    # Criteo: equal lookups everywhere, so cost follows the rows; a cut table is never smaller than a whole one
    specs = mlperf_specs()
    plan = plan_sharding(specs, world_size, "auto", None)
    cut_rows = [specs[p.table].rows for p in plan.placements if p.kind != "table"]
    whole_rows = [specs[p.table].rows for p in plan.placements if p.kind == "table"]
    assert len(whole_rows) > 0
    assert not cut_rows or min(cut_rows) >= max(whole_rows)


def test_auto_cuts_rwsadagrad_tables_by_rows_and_others_by_columns():
    specs = [TableSpec(1000, 16, 1.0), TableSpec(10, 16, 1.0), TableSpec(10, 16, 1.0)]
    for optimizer, kind in (("adagrad", "column"), ("rwsadagrad", "row")):
        plan = plan_sharding(specs, 2, "auto", None, optimizer)
        assert plan.placements[0].kind == kind and plan.placements[0].ranks == (0, 1)


def test_auto_keeps_tables_whole_when_they_already_balance():
    specs = [TableSpec(100, 8, 5.0)] * 4
    plan = plan_sharding(specs, 2, "auto", None)
    assert [p.kind for p in plan.placements] == ["table"] * 4
    assert balance(rank_totals(plan, specs, "sgd", False)) == (1.0, 1.0)


def test_piece_bytes_and_lookups_follow_the_written_rule():
    spec = TableSpec(rows=10, dim=6, lookups_per_step=30.0)
    placements = {"table": Placement(0, "table", (0,), ((0, 10),)),
                  "row": Placement(0, "row", (0, 1), ((0, 4), (4, 10))),
                  "column": Placement(0, "column", (1, 0), ((0, 2), (2, 6)))}
    held = {"table": (10, 6), "row": (6, 6), "column": (10, 4)}  # the second block of each
    for kind, p in placements.items():
        start, stop = p.blocks[-1]
        for optimizer in OPTIMIZERS:
            for pooling in (False, True):
                expected = plain_bytes(*held[kind], optimizer, pooling)
                assert piece_bytes(spec, p, start, stop, optimizer, pooling) == expected
    assert piece_bytes(spec, placements["column"], 2, 6, "rwsadagrad", True) == 4 * (40 + 10 + 20)
    assert [piece_lookups(spec, placements[k], *placements[k].blocks[-1]) for k in held] == [30.0, 18.0, 20.0]


@pytest.mark.parametrize("mode", ["table", "row", "column", "auto"])
def test_rank_totals_equal_a_plain_loop_and_keep_the_sums(mode):
    rng = random.Random(3)
    specs = random_specs(rng, 9)
    for optimizer in OPTIMIZERS:
        plan = plan_sharding(specs, 4, mode, None, optimizer, True)
        totals = rank_totals(plan, specs, optimizer, True)
        expected = plain_totals(plan, specs, optimizer, True)
        assert [b for b, _ in totals] == [b for b, _ in expected]
        assert [lk for _, lk in totals] == pytest.approx([lk for _, lk in expected])
        assert sum(lk for _, lk in totals) == pytest.approx(sum(s.lookups_per_step for s in specs))


def refusal(specs, world_size, mode, budget_bytes, optimizer="sgd"):
    """The one-line message of the ConfigError that plan_sharding raises."""
    with pytest.raises(ConfigError) as caught:
        plan_sharding(specs, world_size, mode, budget_bytes, optimizer)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_table_wise_budget_refusal_names_the_table_and_the_budget():
    specs = [TableSpec(1000, 8, 1.0)] * 3 + [TableSpec(40_000_000, 128, 1.0)]
    message = refusal(specs, 4, "table", 5 * GIB, "adagrad")
    assert message.startswith("table 3 (40000000 rows x 128, 38.1 GiB with its adagrad state) does not fit "
                              "--rank-memory-gib=5.00")
    assert message.endswith("use --sharding=row, column or auto")


def test_auto_fits_a_budget_that_table_wise_does_not_and_refuses_an_impossible_one():
    specs = [TableSpec(1000, 8, 1.0)] * 3 + [TableSpec(40_000_000, 128, 1.0)]
    plan = plan_sharding(specs, 4, "auto", 12 * GIB, "adagrad")
    assert max(b for b, _ in rank_totals(plan, specs, "adagrad", False)) <= 12 * GIB
    assert refusal(specs, 4, "auto", 9 * GIB, "adagrad").startswith(
        "rank 0 would hold 9.54 GiB, over --rank-memory-gib=9.00; its largest table is "
        "table 3 (40000000 rows x 128, 9.54 GiB with its adagrad state on this rank)")


def test_whole_only_table_over_budget_says_it_cannot_be_cut():
    specs = [TableSpec(10, 4, 1.0), TableSpec(2_000_000, 64, 1.0, whole_only=True)]
    assert refusal(specs, 2, "row", 100 * 2 ** 20) == (
        "table 1 (2000000 rows x 64, 0.477 GiB) does not fit --rank-memory-gib=0.0977; it can only be placed "
        "whole (a quotient-remainder or mixed-dimension table): use a larger --rank-memory-gib")


def test_plan_within_the_budget_passes():
    specs = [TableSpec(1000, 8, 1.0)] * 4
    assert plan_sharding(specs, 2, "table", 2 * 1000 * 8 * 4).world_size == 2  # exactly at the budget


@pytest.mark.parametrize("bad", [dict(mode="diagonal"), dict(optimizer="adam"), dict(world_size=0),
                                 dict(budget_bytes=0)])
def test_bad_arguments_are_refused(bad):
    arguments = dict(specs=[TableSpec(4, 4, 1.0)] * 2, world_size=2, mode="row", budget_bytes=None) | bad
    with pytest.raises(ConfigError):
        plan_sharding(**arguments)


def test_table_spec_refuses_empty_tables_and_bad_lookups():
    for args in ((0, 4, 1.0), (4, 0, 1.0), (4, 4, -1.0), (4, 4, float("nan"))):
        with pytest.raises(ConfigError):
            TableSpec(*args)


def test_block_on_and_pieces_on():
    row = Placement(0, "row", (2, 0), ((0, 3), (3, 5)))
    whole = Placement(1, "table", (1,), ((0, 7),))
    plan = ShardingPlan(3, (row, whole), "row")
    assert (row.block_on(2), row.block_on(0), row.block_on(1)) == ((0, 3), (3, 5), None)
    assert [[p.table for p in plan.pieces_on(r)] for r in range(3)] == [[0], [1], [0]]


def test_plans_are_deterministic():
    rng = random.Random(11)
    specs = random_specs(rng, 15, whole_share=0.2)
    for mode in ("table", "row", "column", "auto"):
        assert plan_sharding(specs, 4, mode, None, "adagrad") == plan_sharding(list(specs), 4, mode, None, "adagrad")
    assert plan_sharding(mlperf_specs(), 4, "auto", None) == plan_sharding(mlperf_specs(), 4, "auto", None)


def test_format_plan_lists_every_table_and_rank_with_totals_of_a_plain_loop():
    specs = mlperf_specs()
    plan = plan_sharding(specs, 4, "auto", None, "adagrad")
    lines = format_plan(plan, specs, "adagrad", False, 16 * GIB)
    assert lines[0] == "sharding plan: auto, 4 ranks, budget 16.0 GiB per rank"
    assert lines[1].split() == ["table", "rows", "dim", "bytes", "type", "ranks", "lookups/step"]
    table_lines = lines[2:2 + len(specs)]
    assert len({len(line) for line in table_lines + [lines[1]]}) == 1  # fixed width
    first = table_lines[0].split()
    assert first[:3] == ["0", "4000000", "128"] and first[-1] == "2048"
    assert " ".join(first[3:5]) == human_bytes(2 * 4_000_000 * 128 * 4)
    rank_header = 2 + len(specs)
    assert lines[rank_header].split() == ["rank", "bytes", "lookups/step"]
    expected = plain_totals(plan, specs, "adagrad", False)
    for rank, line in enumerate(lines[rank_header + 1:rank_header + 5]):
        cells = line.split()
        assert cells[0] == str(rank) and " ".join(cells[1:3]) == human_bytes(expected[rank][0])
        assert float(cells[3]) == pytest.approx(expected[rank][1], abs=0.05)
    ratios = [max(t[i] for t in expected) * 4 / sum(t[i] for t in expected) for i in (0, 1)]
    assert lines[rank_header + 5] == f"balance: bytes {ratios[0]:.2f}x, lookups {ratios[1]:.2f}x the mean"
    assert len(lines) == rank_header + 6


def test_format_plan_names_the_kind_and_the_owners():
    specs = [TableSpec(2, 8, 3.0), TableSpec(100, 8, 3.0), TableSpec(50, 8, 3.0, whole_only=True)]
    lines = format_plan(plan_sharding(specs, 4, "row", None), specs, "sgd", False, None)
    assert lines[0] == "sharding plan: row, 4 ranks, budget none"
    assert [line.split()[5:7] for line in lines[2:5]] == [["row", "0,1"], ["row", "0-3"], ["table", "2"]]


def test_human_bytes_and_rank_list():
    assert [human_bytes(n) for n in (512, 3 * 1024, 12 * 2 ** 20, 1.49 * GIB, 1000 * 2 ** 20, 38.1 * GIB)] == \
        ["512 B", "3.00 KiB", "12.0 MiB", "1.49 GiB", "0.977 GiB", "38.1 GiB"]
    assert [rank_list(r) for r in ((0, 1, 2, 3), (1, 2), (3, 0, 1), (2,))] == ["0-3", "1,2", "3,0,1", "2"]


def test_the_benchmark_prints_both_layouts_and_the_plan(capsys):
    assert sharding_balance.main(["--ranks", "4", "--optimizers", "sgd", "--show", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "MLPerf tables, rows capped at 4000000: 24063992 rows x 128, batch 2048"
    table_row, auto_row = (line.split(" | ") for line in out[3:5])
    assert table_row[:3] == ["| 4", "sgd", "table"] and auto_row[:3] == ["| 4", "sgd", "auto"]
    assert float(auto_row[3]) < float(table_row[3]) and float(auto_row[3]) <= 1.15
    assert out[5] == "sharding plan: auto, 4 ranks, budget none"
