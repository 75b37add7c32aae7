"""Tests of fused_embedding.py: FusedTables against per-table nn.EmbeddingBag(sparse=True) + torch.optim.SGD.

Every comparison is bit for bit (``torch.equal``), after every step, on both backends ("cpp", the
C++ extension, and "torch", the pure-torch path) and on 1 and 2 threads. The extension is compiled
once (the first run on a machine takes about half a minute) and then loaded from its cache.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from dlrm.model import dlrm as dlrm_model
from dlrm.model import fused_embedding as fe
from dlrm.run.checkpoint import load_checkpoint
from helpers.kernels import require_built

BACKENDS = ("cpp", "torch")


@pytest.fixture(scope="session", autouse=True)
def built_extension():
    """Build (or load from the cache) the extension once per session; the cpp tests need it."""
    return require_built(fe._load_extension, "the C++ extension")


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Builders


def make_batch(gen, sizes, bags, max_len, as_matrix=False):
    """Random (offsets (T, B), indices) with empty bags (also first and last) and repeated rows.

    Bag lengths are drawn from [0, max_len]; indices from the whole table, so small tables repeat
    rows within and across bags. ``as_matrix``: every bag has exactly ``max_len`` indices and
    ``indices`` is one (T, B * max_len) tensor, as the Criteo loaders give it.
    """
    offsets, indices = [], []
    for rows in sizes:
        if as_matrix:
            lengths = torch.full((bags,), max_len)
        else:
            lengths = torch.randint(0, max_len + 1, (bags,), generator=gen)
            lengths[torch.randint(0, bags, (1,), generator=gen)] = 0
        indices.append(torch.randint(0, rows, (int(lengths.sum()),), generator=gen))
        offsets.append(torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]]))
    return torch.stack(offsets), (torch.stack(indices) if as_matrix else indices)


class PlainTables(nn.Module):
    """The plain path: one EmbeddingBag(sum, sparse) per table, the forward interface of FusedTables."""

    def __init__(self, weights):
        super().__init__()
        self.tables = nn.ModuleList(
            nn.EmbeddingBag(w.shape[0], w.shape[1], mode="sum", sparse=True, _weight=w.clone()) for w in weights)

    def forward(self, offsets, indices, pooling_weights=None):
        out = []
        for t, table in enumerate(self.tables):
            weights = None if pooling_weights is None else pooling_weights[t][indices[t]]
            out.append(table(indices[t], offsets[t], per_sample_weights=weights))
        return out


def loss_of(outputs, dense, gen):
    """A DLRM-like head: cat([x] + outputs) then a random linear read-out, so that each table's
    output gradient is a strided slice of one (B, D_total) tensor, as in the real model."""
    z = torch.cat([dense] + outputs, dim=1)
    w = torch.randn(z.shape, generator=gen)
    return (z * w).sum()


def assert_same(plain, fused, step):
    for t, table in enumerate(plain.tables):
        assert torch.equal(table.weight, fused.table_weight(t)), f"table {t} differs after step {step}"
        assert fused.table_weight(t).grad is None


def train_pair(sizes, dims, backend, steps=4, bags=6, max_len=5, pooling=None, as_matrix=False, seed=0):
    """Train plain and fused side by side on the same batches; compare outputs and tables every step.

    pooling: None, "fixed" (constant per-row weights, buffers) or "learned" (Parameters trained by
    the same SGD). The learning rate changes every step.
    """
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(r, d, generator=gen) for r, d in zip(sizes, dims)]
    plain = PlainTables(weights)
    fused = fe.FusedTables.from_weights(weights, backend=backend)
    assert fused.backends == [backend] * len(sizes)
    pw_plain = pw_fused = None
    if pooling == "fixed":
        pw_plain = pw_fused = [torch.rand(r, generator=gen) + 0.5 for r in sizes]
    elif pooling == "learned":
        init = [torch.rand(r, generator=gen) + 0.5 for r in sizes]
        pw_plain = nn.ParameterList(nn.Parameter(p.clone()) for p in init)
        pw_fused = nn.ParameterList(nn.Parameter(p.clone()) for p in init)
    opt_plain = torch.optim.SGD(list(plain.parameters()) + list(pw_plain.parameters() if pooling == "learned" else []),
                                lr=0.1)
    dense_fused = list(pw_fused.parameters()) if pooling == "learned" else [nn.Parameter(torch.zeros(1))]
    opt_fused = torch.optim.SGD(dense_fused, lr=0.1)
    fused.follow_optimizer_lr(opt_fused)
    for step in range(steps):
        lr = [0.1, 0.37, 0.013, 1.5][step % 4]
        for opt in (opt_plain, opt_fused):
            opt.param_groups[0]["lr"] = lr
        offsets, indices = make_batch(gen, sizes, bags, max_len, as_matrix)
        dense = torch.randn(bags, 3, generator=gen)
        out_plain = plain(offsets, indices, pw_plain)
        out_fused = fused(offsets, indices, pw_fused)
        for t, (a, b) in enumerate(zip(out_plain, out_fused)):
            assert torch.equal(a, b), f"output {t} differs at step {step}"
        head_seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        opt_plain.zero_grad()
        loss_of(out_plain, dense, torch.Generator().manual_seed(head_seed)).backward()
        opt_plain.step()
        opt_fused.zero_grad()
        loss_of(out_fused, dense, torch.Generator().manual_seed(head_seed)).backward()
        opt_fused.step()
        assert_same(plain, fused, step)
        if pooling == "learned":
            for t in range(len(sizes)):
                assert torch.equal(pw_plain[t], pw_fused[t]), f"pooling weights {t} differ after step {step}"
    return plain, fused


# ---------------------------------------------------------------------------------------------
# Exactness against the plain path

CONFIGS = {
    # name: (table sizes, dims, bags, max bag length)
    "tiny-tables": ([1, 3, 1, 2], [4, 4, 4, 4], 5, 4),
    "mixed-dims": ([7, 1, 40, 5, 300], [2, 16, 3, 16, 2], 6, 6),
    "dim64-dups": ([50, 20], [64, 64], 9, 12),
    "odd-dims": ([30, 11, 2], [1, 17, 33], 4, 7),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_embeddingbag_and_sgd(config, backend, threads):
    sizes, dims, bags, max_len = CONFIGS[config]
    train_pair(sizes, dims, backend, bags=bags, max_len=max_len)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pooling", ["fixed", "learned"])
def test_pooling_weights_match(pooling, backend, threads):
    train_pair([9, 1, 60, 4], [4, 4, 16, 5], backend, bags=5, max_len=6, pooling=pooling)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_matrix_one_per_bag(backend):
    # The Criteo layout: indices (T, B), one index per bag, many tables of one dim.
    train_pair([3, 1, 200, 17, 5, 1000], [16] * 6, backend, bags=32, max_len=1, as_matrix=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_lookups_two_threads(backend):
    # Enough lookups for every thread to own many rows and for rows to repeat a lot.
    torch.set_num_threads(2)
    try:
        train_pair([2000, 300, 1], [64, 64, 64], backend, steps=3, bags=64, max_len=60)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_output_leaves_its_table_alone(backend):
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(6, 4, generator=gen) for _ in range(3)]
    fused = fe.FusedTables.from_weights(weights, lr=0.5, backend=backend)
    offsets, indices = make_batch(gen, [6, 6, 6], 4, 3)
    out = fused(offsets, indices)
    (out[0].sum() + out[2].sum()).backward()
    assert torch.equal(fused.table_weight(1), weights[1])
    assert not torch.equal(fused.table_weight(0), weights[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_table_is_not_updated(backend):
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(6, 4, generator=gen) for _ in range(2)]
    fused = fe.FusedTables.from_weights(weights, lr=0.5, backend=backend)
    fused.table_weight(0).requires_grad_(False)
    offsets, indices = make_batch(gen, [6, 6], 4, 3)
    sum(o.sum() for o in fused(offsets, indices)).backward()
    assert torch.equal(fused.table_weight(0), weights[0])
    assert not torch.equal(fused.table_weight(1), weights[1])


@pytest.mark.slow
def test_default_cpu_capability_rounds_like_torch():
    # torch's baseline kernels (ATEN_CPU_CAPABILITY=default) round w + alpha*v in two steps, its
    # AVX2/AVX-512 kernels in one; the module measures which and the kernel must follow.
    script = textwrap.dedent("""
        import torch
        from dlrm.model import fused_embedding as fe
        from test_fused_embedding import train_pair
        assert fe._fused_prefix(16) == 0, fe._fused_prefix(16)
        train_pair([40, 1, 7], [16, 16, 5], "cpp", steps=3, bags=8, max_len=9)
        print("ok", torch.backends.cpu.get_cpu_capability())
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default",
               PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests")]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok", "DEFAULT"]


def test_probe_finds_torchs_rounding_here():
    # On this process's capability (AVX2 or AVX-512) torch fuses: every position is one fma, and
    # the two-rounding form (what -ffp-contract=off alone gives for w + alpha * v) is not exact.
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("baseline capability: covered by test_default_cpu_capability_rounds_like_torch")
    assert [fe._fused_prefix(d) for d in (1, 7, 16, 64)] == [1, 7, 16, 64]
    gen = torch.Generator().manual_seed(6)
    w0, v = torch.randn(256, 16, generator=gen), torch.randn(256, 16, generator=gen) * 100
    param = nn.Parameter(w0.clone())
    param.grad = torch.sparse_coo_tensor(torch.arange(256)[None], v, (256, 16), check_invariants=False)
    torch.optim.SGD([param], lr=0.01).step()
    ext = fe._load_extension()[0]
    results = {}
    for prefix in (16, 0):
        out = w0.clone()
        ext.sgd_update(out, torch.arange(256), torch.arange(257), [v], torch.empty(0), 0.01, prefix)
        results[prefix] = torch.equal(out, param.detach())
    assert results == {16: True, 0: False}


# ---------------------------------------------------------------------------------------------
# Layout, state dict, construction


def test_state_dict_keys_shapes_and_round_trip():
    sizes, dims = [3, 1, 10, 2], [4, 8, 4, 3]
    weights = [torch.randn(r, d) for r, d in zip(sizes, dims)]
    fused = fe.FusedTables.from_weights(weights)
    state = fused.state_dict()
    assert list(state) == [f"{t}.weight" for t in range(4)]
    assert [tuple(v.shape) for v in state.values()] == list(zip(sizes, dims))
    assert [id(p) for p in fused.parameters()] == [id(fused.table_weight(t)) for t in range(4)]
    assert all(torch.equal(state[f"{t}.weight"], weights[t]) for t in range(4))
    other = fe.FusedTables(sizes, dims)
    other.load_state_dict({k: v.clone() for k, v in state.items()})
    assert all(torch.equal(other.table_weight(t), weights[t]) for t in range(4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_built_state_dict_loads_into_the_buffer(backend):
    state = {"0.weight": torch.arange(8.0).view(4, 2), "1.weight": torch.full((1, 2), 7.0)}
    fused = fe.FusedTables([4, 1], 2, lr=0.0, backend=backend)
    fused.load_state_dict(state)
    # offsets: table 0 bags [3, 0] and [], table 1 bags [] and [0]
    out = fused(torch.tensor([[0, 2], [0, 0]]), [torch.tensor([3, 0]), torch.tensor([0])])
    assert torch.equal(out[0], torch.tensor([[6.0, 8.0], [0.0, 0.0]]))
    assert torch.equal(out[1], torch.tensor([[0.0, 0.0], [7.0, 7.0]]))
    with pytest.raises(RuntimeError, match="size mismatch"):
        fused.load_state_dict({"0.weight": torch.zeros(5, 2), "1.weight": torch.zeros(1, 2)})


def test_assign_load_deepcopy_and_to_keep_tables_in_the_buffer():
    weights = [torch.randn(5, 3), torch.randn(2, 3)]
    fused = fe.FusedTables.from_weights(weights, lr=0.25)
    new = {"0.weight": torch.ones(5, 3), "1.weight": torch.zeros(2, 3)}
    fused.load_state_dict(new, assign=True)
    twin = copy.deepcopy(fused)
    moved = fused.to(torch.float64)
    offsets, indices = torch.tensor([[0], [0]]), [torch.tensor([1, 1]), torch.tensor([0])]
    for module, dtype in ((twin, torch.float32), (moved, torch.float64)):
        out = module(offsets, indices)
        assert out[0].dtype == dtype and torch.equal(out[0], torch.full((1, 3), 2.0, dtype=dtype))
        sum(o.sum() for o in out).backward()
        assert torch.equal(module.table_weight(0)[1], torch.full((3,), 0.5, dtype=dtype))
        assert module.table_weight(1).dtype == dtype


def test_from_embedding_bags_releases_sources():
    bags = [nn.EmbeddingBag(4, 2, mode="sum", sparse=True), nn.EmbeddingBag(3, 2, mode="sum", sparse=True)]
    expected = [b.weight.detach().clone() for b in bags]
    fused = fe.FusedTables.from_embedding_bags(bags, release_sources=True)
    assert all(torch.equal(fused.table_weight(t), expected[t]) for t in range(2))
    assert all(b.weight.untyped_storage().size() == 0 for b in bags)
    with pytest.raises(ValueError, match="plain nn.EmbeddingBag"):
        fe.FusedTables.from_embedding_bags([nn.EmbeddingBag(4, 2, mode="mean")])


def test_tables_start_at_64_byte_boundaries():
    fused = fe.FusedTables([3, 5, 1, 7], [2, 3, 2, 3])
    assert all(fused.table_weight(t).data_ptr() % 64 == 0 for t in range(4))


# ---------------------------------------------------------------------------------------------
# Training-loop helpers, limitations, errors


def test_optimizer_helpers():
    fused = fe.FusedTables([4, 2], 2)
    model = nn.ModuleDict({"emb": fused, "mlp": nn.Linear(2, 1)})
    assert [id(p) for p in fe.parameters_excluding_fused(model)] == [id(p) for p in model["mlp"].parameters()]
    assert fused.parameters_updated_in_backward() == [fused.table_weight(0), fused.table_weight(1)]
    assert fe.SUPPORTED_OPTIMIZERS == ("sgd",)
    assert fe.FusedTables.supports_gradient_accumulation is False
    params = list(model["mlp"].parameters())
    with pytest.raises(ValueError, match="support only sgd"):
        fused.follow_optimizer_lr(torch.optim.Adagrad(params))
    with pytest.raises(ValueError, match="momentum=0.9"):
        fused.follow_optimizer_lr(torch.optim.SGD(params, lr=0.1, momentum=0.9))


def test_lr_follows_the_schedule_of_the_step():
    from dlrm.optim.lr_schedule import LRPolicyScheduler

    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(6, 4, generator=gen)
    plain = PlainTables([weight])
    fused = fe.FusedTables.from_weights([weight])
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.5)
    opt_fused = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    fused.follow_optimizer_lr(opt_fused)
    scheds = [LRPolicyScheduler(o, num_warmup_steps=3, decay_start_step=4, num_decay_steps=3)
              for o in (opt_plain, opt_fused)]
    for step in range(7):
        offsets, indices = make_batch(gen, [6], 3, 4)
        for module, opt, sched in ((plain, opt_plain, scheds[0]), (fused, opt_fused, scheds[1])):
            opt.zero_grad()
            module(offsets, indices)[0].pow(2).sum().backward()
            opt.step()
            sched.step()
        assert torch.equal(plain.tables[0].weight, fused.table_weight(0)), step


def test_missing_lr_second_backward_and_bad_inputs_raise():
    fused = fe.FusedTables([4], 2, backend="cpp")
    offsets, indices = torch.tensor([[0, 1]]), [torch.tensor([0, 3])]
    with pytest.raises(RuntimeError, match="lr is not set"):
        fused(offsets, indices)[0].sum().backward()
    fused.lr = 0.1
    loss = fused(offsets, indices)[0].sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    for backend in BACKENDS:
        fused = fe.FusedTables([4], 2, lr=0.1, backend=backend)
        with pytest.raises((IndexError, RuntimeError), match="out of range"):
            fused(offsets, [torch.tensor([0, 4])])
        with pytest.raises(RuntimeError, match="offsets"):
            fused(torch.tensor([[1, 1]]), indices)


def test_build_failure_falls_back_with_one_note(monkeypatch):
    monkeypatch.setattr(fe, "extension_status", lambda: (False, "OSError: no compiler", 0.0))
    notes = []
    plain_weights = [torch.randn(5, 2), torch.randn(3, 4)]
    fused = fe.FusedTables.from_weights(plain_weights, log=notes.append)
    assert fused.backends == ["torch", "torch"]
    assert len(notes) == 1 and "no compiler" in notes[0] and "\n" not in notes[0]
    with pytest.raises(RuntimeError, match="could not be built"):
        fe.FusedTables([5], 2, backend="cpp")


def test_backend_environment_variable_forces_the_torch_path(monkeypatch):
    monkeypatch.setenv(fe.BACKEND_ENV, "torch")
    notes = []
    fused = fe.FusedTables([5], 2, backend="cpp", log=notes.append)
    assert fused.backends == ["torch"] and notes == []


def test_docstring_example_runs():
    import doctest

    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner()
    for test in finder.find(fe.FusedTables, "FusedTables", globs={"torch": torch, "FusedTables": fe.FusedTables}):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0 and runner.summarize(verbose=False).attempted >= 5


def test_inference_forward_takes_no_update():
    weights = [torch.randn(5, 2)]
    fused = fe.FusedTables.from_weights(weights, lr=1.0)
    with torch.no_grad():
        out = fused(torch.tensor([[0]]), [torch.tensor([1, 2])])
    assert not out[0].requires_grad and torch.equal(out[0][0], weights[0][1] + weights[0][2])


# ---------------------------------------------------------------------------------------------
# The fused path inside the whole run: the same printed numbers and the same trained parameters,
# bit for bit, as the plain per-table path (the reference's step).

RUNS = [
    ["--mini-batch-size=2", "--data-size=6", "--debug-mode"],
    ["--mini-batch-size=4", "--data-size=48", "--arch-embedding-size=300-20-1-77", "--num-indices-per-lookup=6",
     "--loss-function=bce", "--round-targets=true", "--test-freq=5", "--learning-rate=0.3", "--nepochs=2"],
    ["--mini-batch-size=3", "--data-size=30", "--weighted-pooling=learned", "--arch-embedding-size=9-40-5",
     "--lr-num-warmup-steps=3", "--lr-decay-start-step=5", "--lr-num-decay-steps=4", "--learning-rate=0.2"],
    ["--mini-batch-size=5", "--data-size=40", "--weighted-pooling=fixed", "--num-indices-per-lookup-fixed=true",
     "--arch-sparse-feature-size=3", "--arch-mlp-bot=4-3", "--arch-interaction-op=cat", "--test-freq=4"],
]


@pytest.mark.slow
@pytest.mark.parametrize("argv", RUNS)
def test_fused_run_prints_and_trains_what_the_plain_run_does(run_main, tmp_path, argv):
    results = {}
    for backend in ("plain", "fused"):
        path = tmp_path / f"{backend}.pt"
        code, out, err = run_main(*argv, f"--embedding-backend={backend}", f"--save-model={path}")
        assert code == 0, err
        out = out.replace(str(path), "CHECKPOINT")
        results[backend] = (out, load_checkpoint(str(path))["state_dict"] if path.exists() else None)
    (plain_out, plain_state), (fused_out, fused_state) = results["plain"], results["fused"]
    assert fused_out == plain_out
    if plain_state is not None:
        assert list(fused_state) == list(plain_state)
        for key in plain_state:
            assert torch.equal(fused_state[key], plain_state[key]), key


def test_a_fused_checkpoint_loads_into_plain_tables_and_back(run_main, tmp_path):
    path = tmp_path / "m.pt"
    args = ["--mini-batch-size=4", "--data-size=24", "--loss-function=bce", "--round-targets=true", "--test-freq=3"]
    code, _, err = run_main(*args, "--embedding-backend=fused", f"--save-model={path}")
    assert code == 0, err
    for backend in ("plain", "fused"):
        code, out, err = run_main(*args, f"--embedding-backend={backend}", f"--load-model={path}", "--inference-only")
        assert code == 0, err
        assert "Testing for inference only" in out


@pytest.mark.parametrize("flags, why", [
    (["--optimizer=adagrad"], "--optimizer is not sgd"),
    (["--qr-flag", "--qr-threshold=2", "--arch-embedding-size=4-3-2"], "--qr-flag"),
    (["--mlperf-logging", "--mlperf-grad-accum-iter=2"], "gradient accumulation"),
])
def test_fused_is_refused_where_it_does_not_apply(run_main, flags, why):
    code, _, err = run_main("--mini-batch-size=2", "--data-size=6", "--embedding-backend=fused", *flags)
    assert code == 2 and why in err and err.startswith("error: --embedding-backend=fused does not apply")


def test_auto_fuses_large_tables_only():
    from dlrm.run.config import embedding_backend
    from dlrm.run.flags import build_parser, config_from_args
    from dlrm.distributed import DistInfo

    def chosen(*argv):
        cfg = config_from_args(build_parser().parse_args(list(argv)))
        return embedding_backend(cfg, cfg.model, DistInfo(), torch.device("cpu"))

    assert chosen() == "plain"
    assert chosen("--arch-embedding-size=600000-500000", "--arch-sparse-feature-size=2") == "fused"
    assert chosen("--arch-embedding-size=600000-500000", "--arch-sparse-feature-size=2", "--optimizer=adagrad") == "plain"


def test_onnx_export_of_a_fused_model(run_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main("--mini-batch-size=2", "--data-size=6", "--embedding-backend=fused", "--save-onnx")
    assert code == 0, err
    assert "checked with onnxruntime" in out


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_tables_from_fused_tables_equal_those_from_plain_ones(bits):
    import numpy as np
    from helpers.models import tiny_model_config

    plain = dlrm_model.DLRM(tiny_model_config(), np.random.RandomState(3))
    fused = dlrm_model.DLRM(tiny_model_config(embedding_backend="fused"), np.random.RandomState(3))
    offsets, indices = torch.tensor([[0, 1]] * 3), torch.tensor([[0, 3], [1, 2], [1, 0]])
    a = dlrm_model.QuantizedTables(plain.emb_l, bits)(offsets, indices)
    b = dlrm_model.QuantizedTables(fused.emb_l, bits)(offsets, indices)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
