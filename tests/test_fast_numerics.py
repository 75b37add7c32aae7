"""fast_numerics: the accelerated Linear, MLPs and dot interaction against plain PyTorch.

Tolerances (float32):
* One layer or interaction, forward and gradients: ``rtol=1e-5`` and ``atol=1e-5 * max|reference|``.
  The GEMMs sum in another order than ``nn.Linear``'s (and oneDNN's fused sigmoid/tanh are its own),
  which moves results by a few ulps of the largest partial sums; the largest difference measured
  over the shapes below was 3e-7 of the tensor's largest magnitude for gradients and 1.4e-6 for a
  tanh output (oneDNN).
* Training drift (see :func:`test_drift_against_plain_model`): per-step losses within
  ``DRIFT_RTOL`` (relative) of the plain model's over 200 SGD steps.

The interaction kernel is compiled on first use (~25 s once per machine and torch version, then
cached); the file runs in ~15-20 s after that.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import fast_numerics as fn
from dlrm_data_pytorch import RandomDataConfig, generate_random_batch
from dlrm_model import DLRM, DotInteraction, ModelConfig, make_loss, top_mlp_input_width
from dlrm_train import Logger, RunParts, TrainConfig, make_optimizer, make_scheduler, train_step

# Largest relative per-step loss difference measured over 200 steps (18 runs: seeds 0-2, mse and
# bce, gemm auto/mkl/onednn, 1 thread): 2.4e-5 with the defaults, 8.0e-5 with gemm="onednn"; many
# runs stay below 1e-6. A ReLU whose input sits near zero can flip and shift the trajectory by ~1e-5
# at once, so the tolerance keeps a 6x margin over the worst run.
DRIFT_RTOL = 5e-4
GEMMS = ("auto", "mkl", "onednn")
ACTS = {"none": lambda t: t, "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """assert_close with rtol=1e-5 and atol=1e-5 of the reference's largest magnitude."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1e-30))


@pytest.fixture
def one_thread():
    """One intra-op thread (faster and steadier on a busy 2-core VM), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("batch,n_in,n_out", [(1, 1, 1), (1, 7, 3), (5, 13, 1), (33, 17, 29), (128, 367, 512),
                                              (257, 100, 64), (300, 257, 300)])
def test_linear_matches_nn_linear(gemm, act, batch, n_in, n_out):
    torch.manual_seed(batch * 1000 + n_in)
    linear = nn.Linear(n_in, n_out)
    fast = fn.FastLinear.from_linear(linear, gemm=gemm)
    x = torch.randn(batch, n_in, requires_grad=True)
    expected = ACTS[act](linear(x))
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, linear.weight, linear.bias), grad_out)
    actual = fast(x, act)
    actual_grads = torch.autograd.grad(actual, (x, fast.weight, fast.bias), grad_out)
    assert_close_scaled(actual, expected)
    for a, e in zip(actual_grads, expected_grads):
        assert_close_scaled(a, e)


@pytest.mark.parametrize("gemm", GEMMS)
def test_linear_without_bias_and_with_leading_dims(gemm):
    torch.manual_seed(0)
    linear = nn.Linear(9, 5, bias=False)
    fast = fn.FastLinear.from_linear(linear, gemm=gemm)
    x = torch.randn(2, 3, 9, requires_grad=True)
    expected, actual = linear(x), fast(x)
    assert actual.shape == (2, 3, 5)
    assert_close_scaled(actual, expected)
    grad_out = torch.randn_like(expected)
    for a, e in zip(torch.autograd.grad(actual, (x, fast.weight), grad_out),
                    torch.autograd.grad(expected, (x, linear.weight), grad_out)):
        assert_close_scaled(a, e)


def test_fast_linear_shares_parameters_and_converts_back():
    linear = nn.Linear(4, 3)
    fast = fn.FastLinear.from_linear(linear)
    assert fast.weight is linear.weight and fast.bias is linear.bias
    assert isinstance(fast, nn.Linear)
    back = fast.to_linear()
    assert type(back) is nn.Linear and back.weight is linear.weight and back.bias is linear.bias


def test_bad_choices_raise():
    with pytest.raises(ValueError, match="gemm must be one of auto, mkl, onednn, got 'blas'"):
        fn.resolve_gemm("blas")
    with pytest.raises(ValueError, match="bf16_gemms must be one of auto, yes, no, got 'maybe'"):
        fn.resolve_bf16("maybe")


# ---------------------------------------------------------------------------------------------
# The interaction
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_kernel():
    """Build (or load from the cache) the interaction kernel once; the "cpp" tests need it."""
    available, reason, _ = fn.extension_status()
    if not available:
        pytest.fail(f"the dot interaction kernel did not build ({reason}); the 'cpp' tests cannot run")


BACKENDS = ("cpp", "torch")


def features(gen: torch.Generator, batch: int, dim: int, tables: int, integers: bool):
    draw = ((lambda: torch.randint(-3, 4, (batch, dim), generator=gen).float()) if integers else
            (lambda: torch.randn(batch, dim, generator=gen)))
    return draw().requires_grad_(), [draw().requires_grad_() for _ in range(tables)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("itself", [False, True])
def test_interaction_exact_on_integers(built_kernel, backend, itself):
    """Integer inputs: every product and sum is exact, so any summation order agrees bit for bit,
    which pins the pair order, the pass-through of x and the backward's symmetrisation."""
    gen = torch.Generator().manual_seed(0)
    dense, embedded = features(gen, 3, 4, 3, integers=True)
    plain, fast = DotInteraction(4, itself), fn.FastDotInteraction(4, itself, backend=backend)
    expected, actual = plain(dense, embedded), fast(dense, embedded)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    grad_out = torch.randint(-2, 3, expected.shape, generator=gen).float()
    inputs = [dense] + embedded
    for a, e in zip(torch.autograd.grad(actual, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,dim,tables", [(1, 1, 1), (64, 16, 26), (70, 64, 8), (5, 13, 2)])
def test_interaction_close_on_floats(built_kernel, backend, batch, dim, tables):
    gen = torch.Generator().manual_seed(batch)
    dense, embedded = features(gen, batch, dim, tables, integers=False)
    expected = DotInteraction(tables + 1)(dense, embedded)
    actual = fn.FastDotInteraction(tables + 1, backend=backend)(dense, embedded)
    assert_close_scaled(actual, expected)
    grad_out = torch.randn(expected.shape, generator=gen)
    inputs = [dense] + embedded
    for a, e in zip(torch.autograd.grad(actual, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)):
        assert_close_scaled(a, e)


def test_interaction_kernel_takes_strided_rows(built_kernel):
    """Pooled embeddings may be column blocks of one (B, T*D) buffer (rows strided by T*D)."""
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(6, 4, generator=gen, requires_grad=True)
    pooled = torch.randn(6, 3 * 4, generator=gen, requires_grad=True)
    embedded = list(pooled.split(4, dim=1))
    expected = DotInteraction(4)(dense, embedded)
    actual = fn.FastDotInteraction(4, backend="cpp")(dense, embedded)
    assert_close_scaled(actual, expected)
    grad_out = torch.randn(expected.shape, generator=gen)
    for a, e in zip(torch.autograd.grad(actual, [dense, pooled], grad_out),
                    torch.autograd.grad(expected, [dense, pooled], grad_out)):
        assert_close_scaled(a, e)


def test_interaction_backend_choice(monkeypatch):
    with pytest.raises(ValueError, match="interaction backend must be one of auto, cpp, torch, got 'cuda'"):
        fn.resolve_interaction_backend("cuda")
    monkeypatch.setattr(fn, "extension_status", lambda: (False, "OSError: no compiler", 0.0))
    assert fn.resolve_interaction_backend("auto") == "torch"
    with pytest.raises(RuntimeError, match="the dot interaction kernel did not build: OSError: no compiler"):
        fn.resolve_interaction_backend("cpp")
    monkeypatch.setenv(fn.INTERACTION_BACKEND_ENV, "torch")
    assert fn.resolve_interaction_backend("cpp") == "torch"


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def small_config(**overrides) -> ModelConfig:
    base = dict(embedding_dim=4, table_sizes=(10, 20, 30), bottom_mlp=(5, 7, 4), top_mlp=(10, 6, 1))
    base.update(overrides)
    return ModelConfig(**base)


def small_batch(cfg: ModelConfig, batch: int, seed: int):
    data = RandomDataConfig(dense_dim=cfg.bottom_mlp[0], table_sizes=cfg.table_sizes, batch_size=batch,
                            num_indices_per_lookup=3)
    return generate_random_batch(np.random.RandomState(seed), batch, data)


def test_keys_parameter_order_and_optimizer_unchanged():
    model = DLRM(small_config(), np.random.RandomState(0))
    keys = list(model.state_dict())
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap: must still train it
    assert fn.accelerate_mlps(model) is model
    assert isinstance(model.bot_l, fn.FastMLP) and isinstance(model.top_l[0], fn.FastLinear)
    assert isinstance(model.interaction, fn.FastDotInteraction)
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    fn.accelerate_mlps(model)  # idempotent
    assert list(model.state_dict()) == keys
    before = model.top_l[0].weight.detach().clone()
    batch = small_batch(model.cfg, 4, 1)
    model(batch.dense_x, batch.offsets, batch.indices).sum().backward()
    optimizer.step()
    assert not torch.equal(model.top_l[0].weight, before)
    fn.restore_mlps(model)
    assert type(model.bot_l) is nn.Sequential and type(model.top_l[0]) is nn.Linear
    assert type(model.interaction) is DotInteraction
    assert list(model.state_dict()) == keys and all(a is b for a, b in zip(model.parameters(), params))


def test_accelerate_refuses_non_cpu_models():
    model = DLRM(small_config(), np.random.RandomState(0)).to("meta")
    with pytest.raises(ValueError, match="--fast-numerics runs on the CPU only; the MLPs are on meta"):
        fn.accelerate_mlps(model)


def test_state_dict_loads_across():
    plain = DLRM(small_config(), np.random.RandomState(0))
    fast = fn.accelerate_mlps(DLRM(small_config(), np.random.RandomState(1)))
    fast.load_state_dict(plain.state_dict())
    batch = small_batch(plain.cfg, 6, 2)
    assert_close_scaled(fast(batch.dense_x, batch.offsets, batch.indices),
                        plain(batch.dense_x, batch.offsets, batch.indices))


@pytest.mark.parametrize("interaction", ["dot", "cat"])
@pytest.mark.parametrize("gemm", GEMMS)
def test_trains_like_plain_model(gemm, interaction):
    cfg = small_config(interaction=interaction)
    cfg = ModelConfig(**{**cfg.__dict__, "top_mlp": (top_mlp_input_width(interaction, False, 3, 4), 6, 1)})
    plain = DLRM(cfg, np.random.RandomState(0))
    fast = fn.accelerate_mlps(copy.deepcopy(plain), gemm=gemm)
    losses = {}
    for name, model in (("plain", plain), ("fast", fast)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = make_loss("mse")
        batch = small_batch(cfg, 8, 3)
        losses[name] = []
        for _ in range(6):
            loss = loss_fn(model(batch.dense_x, batch.offsets, batch.indices), batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert losses["fast"][-1] < losses["fast"][0]
    np.testing.assert_allclose(losses["fast"], losses["plain"], rtol=1e-5)


@pytest.mark.parametrize("bf16_gemms", ["yes", "no"])
def test_bf16_autocast(bf16_gemms):
    """Under bf16 autocast the model runs either policy; outputs stay float32 and near the float32
    model's (bf16 keeps 8 bits of mantissa), and gradients reach every parameter."""
    cfg = small_config()
    plain = DLRM(cfg, np.random.RandomState(0))
    fast = fn.accelerate_mlps(copy.deepcopy(plain), bf16_gemms=bf16_gemms)
    assert fast.top_l[0].bf16 is (bf16_gemms == "yes")
    assert "under --mixed-precision=bf16" in fn.describe(bf16_gemms=bf16_gemms)
    batch = small_batch(cfg, 6, 4)
    expected = plain(batch.dense_x, batch.offsets, batch.indices)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = fast(batch.dense_x, batch.offsets, batch.indices)
    assert actual.dtype == torch.float32
    if bf16_gemms == "no":
        assert_close_scaled(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)
    actual.sum().backward()
    for name, p in fast.named_parameters():
        if not name.startswith("emb_l."):
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def drift_run(loss_name: str, gemm: str, steps: int):
    """Per-step losses of the plain and the accelerated model, trained side by side through
    ``dlrm_train.train_step`` on the same random batches: a scaled-down CPU benchmark model (batch
    256, bottom 64-64-16, top (26)-128-128-1, 4 tables of 5000 rows, D=16), SGD at lr 0.1."""
    tables, dim = 4, 16
    cfg = ModelConfig(embedding_dim=dim, table_sizes=(5000,) * tables, bottom_mlp=(64, 64, dim),
                      top_mlp=(top_mlp_input_width("dot", False, tables, dim), 128, 128, 1))
    plain = DLRM(cfg, np.random.RandomState(0))
    fast = fn.accelerate_mlps(copy.deepcopy(plain), gemm=gemm)
    tcfg = TrainConfig(batch_size=256, learning_rate=0.1, loss_function=loss_name)
    data = RandomDataConfig(dense_dim=64, table_sizes=cfg.table_sizes, batch_size=256, num_indices_per_lookup=10)
    rng = np.random.RandomState(1)
    batches = [generate_random_batch(rng, 256, data) for _ in range(20)]
    losses = []
    for model in (plain, fast):
        optimizer = make_optimizer("sgd", list(model.parameters()), tcfg.learning_rate)
        parts = RunParts(model, make_loss(loss_name), optimizer, make_scheduler(optimizer, tcfg), None, None,
                         0, 0, torch.device("cpu"), Logger())
        losses.append(np.array([train_step(parts, tcfg, batches[j % 20], j).item() for j in range(steps)]))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("loss_name,gemm", [("mse", "auto"), ("bce", "auto"), ("mse", "onednn")])
def test_drift_against_plain_model(one_thread, loss_name, gemm):
    plain, fast = drift_run(loss_name, gemm, steps=200)
    assert plain[-1] < plain[0] and fast[-1] < fast[0]
    np.testing.assert_allclose(fast, plain, rtol=DRIFT_RTOL, atol=0)
