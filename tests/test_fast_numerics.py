"""fast_numerics: the accelerated Linear, MLPs and dot interaction against plain PyTorch.

Tolerances (float32), none of them tuned to a CPU:
* One layer or interaction, forward and gradients: the accelerated result lies within the rounding
  bound of a float32 matrix product in any summation order, gamma_K * (|A| @ |B|) element by
  element (``helpers.bounds``), of the exact result computed in float64 from the same inputs. The
  activations add their own rounding: ``ACT_ULPS`` units in the last place of the output.
* Training drift (see :func:`test_drift_against_plain_model`): per-step losses within
  ``DRIFT_RTOL`` (relative) of the plain model's over 200 SGD steps.

The interaction kernel is compiled on first use (~25 s once per machine and torch version, then
cached); the file runs in ~15-20 s after that.
"""
import copy
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from dlrm.data.random import RandomDataConfig, generate_random_batch
from dlrm.model import fast_numerics as fn
from dlrm.model.dlrm import DLRM, DotInteraction, ModelConfig, make_loss, top_mlp_input_width
from dlrm.run.train import Logger, RunParts, TrainConfig, make_optimizer, make_scheduler, train_step
from helpers.bounds import FLOAT32_UNIT_ROUNDOFF as U, assert_within, gamma, matmul_bound
from helpers.kernels import require_built
from helpers.runs import SMALL

# Training drift. A float32 trajectory, the default path's as much as the accelerated one's, leaves
# the float64 trajectory of the same steps in jumps: a ReLU whose input sits within rounding of zero
# takes the other side, and the per-step loss moves by about 1e-5 relative at once (measured: 2.7e-5
# for the plain float32 model, 1.1e-5 for the accelerated one, in 200 steps). Between jumps the paths
# stay within a few 1e-7. 5e-4 leaves room for about twenty such jumps in either path; the test
# measures both paths against the float64 trajectory, so the bound is one the default float32 path
# must meet on the same CPU too.
DRIFT_RTOL = 5e-4
GEMMS = ("auto", "mkl", "onednn")
ACTS = {"none": lambda t: t, "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
# The activations' derivatives from their outputs, and how far a change of the input can move the
# output (Lipschitz constants: 1 for none, relu and tanh; 1/4 for sigmoid).
ACT_DERIVATIVE = {"none": lambda y: torch.ones_like(y), "relu": lambda y: (y > 0).to(y.dtype),
                  "sigmoid": lambda y: y * (1 - y), "tanh": lambda y: 1 - y * y}
ACT_LIPSCHITZ = {"none": 1.0, "relu": 1.0, "sigmoid": 0.25, "tanh": 1.0}
# sigmoid and tanh are vectorised approximations (libm-like in ATen, polynomials in oneDNN): each
# is within a few units in the last place of its output; 8 covers both with room.
ACT_ULPS = 8


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


def linear_bounds(x, weight, bias, act, y, grad_out):
    """The exact (float64) forward and gradients of ``act(x @ weight.T + bias)``, and the float32
    rounding bound of each, for any summation order.

    The forward sums n_in products and the bias. The gradients pass through g' = grad_out *
    act'(y), taken at the float32 output ``y`` that the layer under test computed (at a ReLU's
    kink, its own side decides); forming g' rounds it by at most 3u relative. Then grad_x = g' @ W
    sums n_out terms, grad_W = g'.T @ x and grad_b sum the batch.
    """
    x64, w64, b64 = x.detach().double(), weight.detach().double(), bias.detach().double()
    z = x64 @ w64.T + b64
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
    z_bound = gamma(x.shape[1] + 1) * (x64.abs() @ w64.abs().T + b64.abs())
    exact_y = ACTS[act](z)
    y_bound = ACT_LIPSCHITZ[act] * z_bound + ACT_ULPS * U * exact_y.abs()
    g = grad_out.double() * ACT_DERIVATIVE[act](y.detach().double())
    slack = 1 + 3 * U
    grads = (g @ w64, g.T @ x64, g.sum(0))
    bounds = (slack * matmul_bound(g, w64) + 3 * U * (g.abs() @ w64.abs()),
              slack * matmul_bound(g.T, x64) + 3 * U * (g.abs().T @ x64.abs()),
              (slack * matmul_bound(g.T, ones) + 3 * U * (g.abs().T @ ones)).reshape(-1))
    return (exact_y, y_bound), list(zip(grads, bounds))


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("batch,n_in,n_out", [(1, 1, 1), (1, 7, 3), (5, 13, 1), (33, 17, 29), (128, 367, 512),
                                              (257, 100, 64), (300, 257, 300)])
def test_linear_is_within_float32_rounding_of_the_exact_layer(gemm, act, batch, n_in, n_out):
    torch.manual_seed(batch * 1000 + n_in)
    linear = nn.Linear(n_in, n_out)
    fast = fn.FastLinear.from_linear(linear, gemm=gemm)
    x = torch.randn(batch, n_in, requires_grad=True)
    actual = fast(x, act)
    grad_out = torch.randn_like(actual)
    actual_grads = torch.autograd.grad(actual, (x, fast.weight, fast.bias), grad_out)
    (exact, bound), grads = linear_bounds(x, linear.weight, linear.bias, act, actual, grad_out)
    assert_within(actual, exact, bound, "output")
    for name, a, (e, b) in zip(("grad x", "grad weight", "grad bias"), actual_grads, grads):
        assert_within(a, e, b, name)


@pytest.mark.parametrize("act", sorted(ACTS))
def test_the_bound_holds_for_nn_linear_and_catches_a_wrong_layer(act):
    """The bound is the one torch's own layer meets, and a layer off by one rounding of its bias
    is caught."""
    torch.manual_seed(3)
    linear = nn.Linear(57, 31)
    x = torch.randn(40, 57, requires_grad=True)
    actual = ACTS[act](linear(x))
    grad_out = torch.randn_like(actual)
    actual_grads = torch.autograd.grad(actual, (x, linear.weight, linear.bias), grad_out)
    (exact, bound), grads = linear_bounds(x, linear.weight, linear.bias, act, actual, grad_out)
    assert_within(actual, exact, bound, "output")
    for a, (e, b) in zip(actual_grads, grads):
        assert_within(a, e, b)
    with pytest.raises(AssertionError, match="grad bias"):
        assert_within(actual_grads[2] * (1 + 1e-4), grads[2][0], grads[2][1], "grad bias")


@pytest.mark.parametrize("gemm", GEMMS)
def test_linear_without_bias_and_with_leading_dims(gemm):
    torch.manual_seed(0)
    linear = nn.Linear(9, 5, bias=False)
    fast = fn.FastLinear.from_linear(linear, gemm=gemm)
    x = torch.randn(2, 3, 9, requires_grad=True)
    actual = fast(x)
    assert actual.shape == (2, 3, 5)
    grad_out = torch.randn_like(actual)
    grad_x, grad_w = torch.autograd.grad(actual, (x, fast.weight), grad_out)
    zero_bias = torch.zeros(5)
    (exact, bound), grads = linear_bounds(x.reshape(6, 9), linear.weight, zero_bias, "none", actual.reshape(6, 5),
                                          grad_out.reshape(6, 5))
    assert_within(actual.reshape(6, 5), exact, bound, "output")
    assert_within(grad_x.reshape(6, 9), *grads[0], "grad x")
    assert_within(grad_w, *grads[1], "grad weight")


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
    require_built(fn._load_extension, "the dot interaction kernel")


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


def interaction_bounds(features: torch.Tensor, grad_out: torch.Tensor, itself: bool = False):
    """The exact (float64) dot interaction of ``features`` (B, F, D) and its gradient for
    ``grad_out`` (B, D + P), with the float32 rounding bound of each, for any summation order.

    Each pair is a dot product of D terms. The gradient of feature k sums, over the pairs that hold
    it, grad * the other feature (a diagonal pair counts twice), plus the pass-through of x: at
    most F + 1 products per element.
    """
    batch, num, dim = features.shape
    v = features.detach().double()
    pairs = [(i, j) for i in range(num) for j in range(i + (1 if itself else 0))]
    rows, cols = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    exact = torch.cat([v[:, 0], (v[:, rows] * v[:, cols]).sum(-1)], dim=1)
    bound = torch.cat([torch.zeros(batch, dim, dtype=torch.float64),
                       gamma(dim) * (v[:, rows].abs() * v[:, cols].abs()).sum(-1)], dim=1)
    g = torch.zeros(batch, num, num, dtype=torch.float64)  # d out / d <v_i, v_j>, placed symmetrically
    g[:, rows, cols] += grad_out[:, dim:].double()
    g[:, cols, rows] += grad_out[:, dim:].double()
    grad = g @ v  # (B, F, D)
    grad[:, 0] += grad_out[:, :dim].double()
    grad_bound = gamma(num + 1) * (g.abs() @ v.abs())
    grad_bound[:, 0] += gamma(num + 1) * grad_out[:, :dim].double().abs()
    return (exact, bound), (grad, grad_bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,dim,tables", [(1, 1, 1), (64, 16, 26), (70, 64, 8), (5, 13, 2)])
def test_interaction_is_within_float32_rounding_of_the_exact_one(built_kernel, backend, batch, dim, tables):
    gen = torch.Generator().manual_seed(batch)
    dense, embedded = features(gen, batch, dim, tables, integers=False)
    actual = fn.FastDotInteraction(tables + 1, backend=backend)(dense, embedded)
    grad_out = torch.randn(actual.shape, generator=gen)
    inputs = [dense] + embedded
    (exact, bound), (grad, grad_bound) = interaction_bounds(torch.stack(inputs, dim=1), grad_out)
    assert_within(actual, exact, bound, "output")
    for k, a in enumerate(torch.autograd.grad(actual, inputs, grad_out)):
        assert_within(a, grad[:, k], grad_bound[:, k], f"grad of feature {k}")
    plain = DotInteraction(tables + 1)(dense, embedded)  # the bound is the one the plain module meets
    assert_within(plain, exact, bound, "plain output")


def test_interaction_kernel_takes_strided_rows(built_kernel):
    """Pooled embeddings may be column blocks of one (B, T*D) buffer (rows strided by T*D)."""
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(6, 4, generator=gen, requires_grad=True)
    pooled = torch.randn(6, 3 * 4, generator=gen, requires_grad=True)
    embedded = list(pooled.split(4, dim=1))
    actual = fn.FastDotInteraction(4, backend="cpp")(dense, embedded)
    grad_out = torch.randn(actual.shape, generator=gen)
    (exact, bound), (grad, grad_bound) = interaction_bounds(torch.stack([dense] + embedded, dim=1), grad_out)
    assert_within(actual, exact, bound, "output")
    grad_dense, grad_pooled = torch.autograd.grad(actual, [dense, pooled], grad_out)
    assert_within(grad_dense, grad[:, 0], grad_bound[:, 0], "grad of x")
    assert_within(grad_pooled, grad[:, 1:].flatten(1), grad_bound[:, 1:].flatten(1), "grad of the pooled rows")


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
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))


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
    np.testing.assert_allclose(losses["fast"], losses["plain"], rtol=DRIFT_RTOL)  # the training drift bound


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
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = fast(batch.dense_x, batch.offsets, batch.indices)
    assert actual.dtype == torch.float32
    if bf16_gemms == "no":  # float32 GEMMs under autocast: the very computation made without it
        assert torch.equal(actual, fast(batch.dense_x, batch.offsets, batch.indices))
    else:
        # Each of the model's 4 GEMM layers rounds both operands to bf16 (unit roundoff 2**-8), so
        # to first order the output (a probability, at most 1) moves by at most 4 * 2 * 2**-8.
        expected = plain(batch.dense_x, batch.offsets, batch.indices)
        torch.testing.assert_close(actual, expected, rtol=0, atol=8 * 2.0 ** -8)
    actual.sum().backward()
    for name, p in fast.named_parameters():
        if not name.startswith("emb_l."):
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def drift_run(loss_name: str, gemm: str, steps: int):
    """Per-step losses of the plain, the accelerated and the float64 model, trained side by side
    through ``dlrm_train.train_step`` on the same random batches: a scaled-down CPU benchmark model
    (batch 256, bottom 64-64-16, top (26)-128-128-1, 4 tables of 5000 rows, D=16), SGD at lr 0.1."""
    tables, dim = 4, 16
    cfg = ModelConfig(embedding_dim=dim, table_sizes=(5000,) * tables, bottom_mlp=(64, 64, dim),
                      top_mlp=(top_mlp_input_width("dot", False, tables, dim), 128, 128, 1))
    plain = DLRM(cfg, np.random.RandomState(0))
    fast = fn.accelerate_mlps(copy.deepcopy(plain), gemm=gemm)
    exact = copy.deepcopy(plain).double()
    tcfg = TrainConfig(batch_size=256, learning_rate=0.1, loss_function=loss_name)
    data = RandomDataConfig(dense_dim=64, table_sizes=cfg.table_sizes, batch_size=256, num_indices_per_lookup=10)
    rng = np.random.RandomState(1)
    batches = [generate_random_batch(rng, 256, data) for _ in range(20)]
    losses = []
    for model in (plain, fast, exact):
        optimizer = make_optimizer("sgd", list(model.parameters()), tcfg.learning_rate)
        parts = RunParts(model, make_loss(loss_name), optimizer, make_scheduler(optimizer, tcfg), None, None,
                         0, 0, torch.device("cpu"), Logger())
        dtype = next(model.parameters()).dtype
        as_dtype = [b._replace(dense_x=b.dense_x.to(dtype), labels=b.labels.to(dtype)) for b in batches]
        losses.append(np.array([train_step(parts, tcfg, as_dtype[j % 20], j).item() for j in range(steps)]))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("loss_name,gemm", [("mse", "auto"), ("bce", "auto"), ("mse", "onednn")])
def test_drift_against_plain_model(one_thread, loss_name, gemm):
    """Both float32 paths stay within DRIFT_RTOL of the float64 trajectory over 200 steps."""
    plain, fast, exact = drift_run(loss_name, gemm, steps=200)
    assert plain[-1] < plain[0] and fast[-1] < fast[0]
    np.testing.assert_allclose(plain, exact, rtol=DRIFT_RTOL, atol=0, err_msg="the default float32 path")
    np.testing.assert_allclose(fast, exact, rtol=DRIFT_RTOL, atol=0, err_msg="the accelerated path")


def test_fast_numerics_from_the_command_line_stays_close_to_the_exact_run(run_main):
    args = ["--mini-batch-size=256", "--data-size=2048", "--arch-mlp-bot=64-64-16", "--arch-sparse-feature-size=16",
            "--arch-embedding-size=500-300-200-100", "--arch-mlp-top=128-128-1", "--loss-function=bce",
            "--round-targets=true", "--learning-rate=0.1"]
    code, exact, err = run_main(*args)
    assert code == 0, err
    code, fast, err = run_main(*args, "--fast-numerics")
    assert code == 0, err
    assert "fast numerics:" in err
    a, b = ([float(x) for x in re.findall(r"loss (\d\.\d+)", out)] for out in (exact, fast))
    assert len(a) == len(b) == 8 and np.allclose(a, b, rtol=5e-4, atol=0)  # fast_numerics.DRIFT_RTOL


def test_fast_numerics_is_for_cpus(run_main):
    code, _, err = run_main(*SMALL, "--fast-numerics", "--use-gpu")
    assert code == 2 and "--fast-numerics is for CPUs" in err


def test_emulated_bf16_is_said_once(run_main):
    from dlrm.model import fast_numerics

    code, _, err = run_main(*SMALL, "--mixed-precision=bf16")
    assert code == 0, err
    assert (err.count("no native bfloat16") == 1) != fast_numerics.has_native_bf16()
