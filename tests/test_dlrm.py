"""The model's parts against plain computations: interactions, initialisation, pooling, losses."""
import numpy as np
import pytest
import torch

from dlrm.model import dlrm
from helpers.models import tiny_model_config
from helpers.runs import SMALL


def naive_dot(dense, embedded, itself):
    """Per sample: x, then <v_i, v_j> for i = 0..T, j < i (j <= i with itself), row by row."""
    out = []
    for b in range(dense.shape[0]):
        feats = [dense[b]] + [e[b] for e in embedded]
        row = list(dense[b])
        for i in range(len(feats)):
            for j in range(i + 1 if itself else i):
                row.append(sum(float(p) * float(q) for p, q in zip(feats[i], feats[j])))
        out.append(row)
    return torch.tensor(out, dtype=dense.dtype)


@pytest.mark.parametrize("itself", [False, True])
@pytest.mark.parametrize("tables", [1, 3])
def test_dot_interaction_equals_naive_loop(itself, tables):
    g = torch.Generator().manual_seed(0)
    dense = torch.randint(-4, 5, (3, 4), generator=g).double()  # integers: exact, order-revealing
    embedded = [torch.randint(-4, 5, (3, 4), generator=g).double() for _ in range(tables)]
    layer = dlrm.DotInteraction(tables + 1, itself)
    got = layer(dense, embedded)
    torch.testing.assert_close(got, naive_dot(dense, embedded, itself), rtol=0, atol=0)
    assert got.shape[1] == layer.output_width(4) == dlrm.top_mlp_input_width("dot", itself, tables, 4)
    assert not layer.state_dict()  # no new checkpoint keys


def test_cat_interaction():
    dense, e1, e2 = torch.ones(2, 3), torch.zeros(2, 3), torch.full((2, 3), 2.0)
    layer = dlrm.CatInteraction(3)
    assert torch.equal(layer(dense, [e1, e2]), torch.cat([dense, e1, e2], dim=1))
    assert layer.output_width(3) == 9 == dlrm.top_mlp_input_width("cat", False, 2, 3)


def test_parameters_are_the_reference_numpy_draws():
    """The reference's draws: tables uniform(±sqrt(1/n)), then each Linear's weight and bias normals."""
    cfg = tiny_model_config()
    model = dlrm.DLRM(cfg, np.random.RandomState(42))
    r = np.random.RandomState(42)
    expected = [r.uniform(-np.sqrt(1 / n), np.sqrt(1 / n), (n, 2)) for n in cfg.table_sizes]
    for widths in (cfg.bottom_mlp, cfg.top_mlp):
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            expected.append(r.normal(0, np.sqrt(2 / (n_out + n_in)), (n_out, n_in)))
            expected.append(r.normal(0, np.sqrt(1 / n_out), n_out))
    got = [p.detach().numpy() for p in model.parameters()]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert np.array_equal(a, b.astype(np.float32))


@pytest.mark.parametrize("fix", [False, True])
def test_qr_model_draws_as_the_reference(fix):
    """The reference builds every table in order: a plain table runs torch's normal init (moving torch's
    RNG) and is overwritten from NumPy; a QR table draws from torch's RNG on U(sqrt(1/n), 1) and takes
    nothing from NumPy. With --fix-reference-bugs QR tables draw symmetric values from NumPy."""
    sizes = (5, 300, 7, 250)
    cfg = tiny_model_config(table_sizes=sizes, embedding_dim=2, bottom_mlp=(4, 2),
                            top_mlp=(dlrm.top_mlp_input_width("dot", False, 4, 2), 1), qr_flag=True,
                            qr_threshold=100, qr_collisions=4, fix_reference_bugs=fix)
    torch.manual_seed(11)
    model = dlrm.DLRM(cfg, np.random.RandomState(3))
    torch.manual_seed(11)
    rng = np.random.RandomState(3)
    for t, n in enumerate(sizes):
        table = model.emb_l[t]
        if n <= 100:
            torch.empty(n, 2).normal_()  # nn.EmbeddingBag's own init, then overwritten
            expected = rng.uniform(-np.sqrt(1 / n), np.sqrt(1 / n), (n, 2)).astype(np.float32)
            assert np.array_equal(table.weight.detach().numpy(), expected)
            continue
        rows_q = -(-n // 4)
        if fix:
            q = rng.uniform(-np.sqrt(1 / rows_q), np.sqrt(1 / rows_q), (rows_q, 2)).astype(np.float32)
            r = rng.uniform(-np.sqrt(1 / 4), np.sqrt(1 / 4), (4, 2)).astype(np.float32)
            q, r = torch.from_numpy(q), torch.from_numpy(r)
        else:
            q = torch.empty(rows_q, 2).uniform_(np.sqrt(1 / n), 1.0)
            r = torch.empty(4, 2).uniform_(np.sqrt(1 / n), 1.0)
        assert torch.equal(table.weight_q.detach(), q) and torch.equal(table.weight_r.detach(), r)
        assert table.exact_quotient == fix
    bottom = rng.normal(0, np.sqrt(2 / (2 + 4)), (2, 4)).astype(np.float32)  # the MLPs follow the tables
    assert np.array_equal(model.bot_l[0].weight.detach().numpy(), bottom)


def test_state_dict_keys_match_reference():
    model = dlrm.DLRM(tiny_model_config(weighted_pooling="learned"), np.random.RandomState(1))
    keys = set(model.state_dict())
    assert {"emb_l.0.weight", "emb_l.2.weight", "v_W_l.0", "v_W_l.2", "bot_l.0.weight", "bot_l.2.bias",
            "top_l.0.weight", "top_l.4.bias"} <= keys
    assert all(k.split(".")[0] in {"emb_l", "v_W_l", "bot_l", "top_l"} for k in keys)


def _plain_forward(model, dense, offsets, indices, pooling=None):
    x = model.bot_l(dense)
    pooled = []
    for t, table in enumerate(model.emb_l):
        ends = list(offsets[t, 1:]) + [len(indices[t])]
        rows = []
        for start, end in zip(offsets[t].tolist(), ends):
            bag = indices[t][start:end]
            w = table.weight[bag]
            if pooling is not None:
                w = w * pooling[t][bag].unsqueeze(1)
            rows.append(w.sum(0))
        pooled.append(torch.stack(rows))
    return model.top_l(naive_dot(x.detach().double(), [p.detach().double() for p in pooled], False).to(x.dtype))


@pytest.mark.parametrize("pooling", [None, "fixed", "learned"])
def test_forward_equals_plain_computation(pooling):
    #          sample 0     sample 1
    # table 0  [0, 3]       [1]
    # table 1  [2]          []        (an empty bag pools to zeros)
    # table 2  [1, 1]       [0]
    model = dlrm.DLRM(tiny_model_config(weighted_pooling=pooling), np.random.RandomState(5))
    if pooling == "learned":
        with torch.no_grad():
            model.v_W_l[0].copy_(torch.tensor([0.5, 2.0, 1.0, -1.0]))
    model.double()  # the plain computation sums in its own order: compare the algebra in float64
    dense = torch.rand(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    offsets = torch.tensor([[0, 2], [0, 1], [0, 2]])
    indices = [torch.tensor([0, 3, 1]), torch.tensor([2]), torch.tensor([1, 1, 0])]
    got = model(dense, offsets, indices)
    weights = model.pooling_weights()
    expected = _plain_forward(model, dense, offsets, indices, weights)
    assert got.dtype == torch.float64
    # Sums of at most 8 terms through 4 layers of values below 10: reordering moves the result by
    # far less than 2 * 8 * 4 * 2**-53 * 10 = 7e-14.
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)


def test_embedding_gradients_are_sparse():
    model = dlrm.DLRM(tiny_model_config(), np.random.RandomState(5))
    out = model(torch.rand(2, 4), torch.tensor([[0, 1]] * 3), torch.tensor([[0, 1]] * 3))
    out.sum().backward()
    assert model.emb_l[0].weight.grad.is_sparse


def test_loss_threshold_clamps():
    model = dlrm.DLRM(tiny_model_config(loss_threshold=0.4), np.random.RandomState(5))
    out = model(torch.rand(8, 4) * 10, torch.tensor([list(range(8))] * 3), torch.zeros(3, 8, dtype=torch.long))
    assert out.min() >= 0.4 and out.max() <= 0.6


def test_activation_function_is_honoured():
    """The reference ignored --activation-function."""
    model = dlrm.DLRM(tiny_model_config(activation="tanh"), np.random.RandomState(5))
    assert isinstance(model.bot_l[1], torch.nn.Tanh) and isinstance(model.top_l[1], torch.nn.Tanh)
    assert isinstance(model.top_l[-1], torch.nn.Sigmoid)


def test_losses():
    probs = torch.tensor([[0.9], [0.2], [0.6]])
    labels = torch.tensor([[1.0], [0.0], [0.0]])
    mse = dlrm.make_loss("mse")(probs, labels)
    assert mse.item() == pytest.approx(((0.1 ** 2) + 0.2 ** 2 + 0.6 ** 2) / 3, rel=1e-6)
    bce = [-np.log(0.9), -np.log(0.8), -np.log(0.4)]
    assert dlrm.make_loss("bce")(probs, labels).item() == pytest.approx(np.mean(bce), rel=1e-6)
    wbce = dlrm.make_loss("wbce", (0.5, 2.0))(probs, labels)
    assert wbce.dtype == torch.float64
    assert wbce.item() == pytest.approx(np.mean([2.0 * bce[0], 0.5 * bce[1], 0.5 * bce[2]]), rel=1e-6)


@pytest.mark.parametrize("bits, tol", [(8, 0.02), (4, 0.2)])
@pytest.mark.parametrize("pooling", [None, "learned"])
def test_quantized_tables_approximate_float_lookups(bits, tol, pooling):
    model = dlrm.DLRM(tiny_model_config(table_sizes=(40, 7, 3), embedding_dim=8, bottom_mlp=(4, 8),
                                        top_mlp=(dlrm.top_mlp_input_width("dot", False, 3, 8), 1),
                                        weighted_pooling=pooling), np.random.RandomState(2))
    offsets = torch.tensor([[0, 2, 3]] * 3)
    indices = [torch.tensor([39, 1, 5, 7]), torch.tensor([6, 0, 0, 3]), torch.tensor([2, 1, 0, 2])]
    weights = model.pooling_weights()
    expected = model.emb_l(offsets, indices, weights)
    quantized = dlrm.QuantizedTables(model.emb_l, bits)
    for got, want in zip(quantized(offsets, indices, weights), expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=tol)


def test_quantized_inference_from_the_command_line(run_main):
    for bits in ("4", "8"):
        code, out, err = run_main("--mini-batch-size=2", "--data-size=6", "--inference-only",
                                  f"--quantize-emb-with-bit={bits}")
        assert code == 0, err
        assert "Testing for inference only" in out
    code, _, err = run_main("--mini-batch-size=2", "--data-size=6", "--inference-only", "--quantize-emb-with-bit=8",
                            "--qr-flag")
    assert code == 2 and "plain tables only" in err


@pytest.mark.parametrize("bits", ["8", "16"])
def test_inference_with_quantized_mlps(run_main, bits):
    code, out, err = run_main(*SMALL, "--inference-only", f"--quantize-mlp-with-bit={bits}")
    assert code == 0, err
    assert "Testing for inference only" in out and " accuracy " in out


TRICK_BASE = ["--mini-batch-size=4", "--data-size=16", "--arch-embedding-size=1000-50-300",
              "--arch-sparse-feature-size=8"]


@pytest.mark.parametrize("flags", [
    ["--qr-flag", "--qr-threshold=100", "--qr-operation=mult", "--arch-mlp-bot=4-8"],
    ["--qr-flag", "--qr-threshold=100", "--qr-operation=add", "--arch-mlp-bot=4-8"],
    ["--qr-flag", "--qr-threshold=100", "--qr-operation=concat", "--arch-mlp-bot=4-16"],  # small tables get 2D
    ["--md-flag", "--md-threshold=100", "--arch-mlp-bot=4-8"],  # a table below the threshold
    ["--md-flag", "--md-threshold=100", "--md-round-dims", "--arch-mlp-bot=4-8"],
])
def test_qr_and_md_tables_train(run_main, tmp_path, flags):
    path = tmp_path / "m.pt"
    code, out, err = run_main(*TRICK_BASE, *flags, "--test-freq=4", "--round-targets=1", "--loss-function=bce",
                              f"--save-model={path}")
    assert code == 0, err
    assert out.count("Finished training it") == 4
    from dlrm.run.checkpoint import load_checkpoint

    keys = load_checkpoint(str(path))["state_dict"]
    assert "emb_l.1.weight" in keys  # the 50-row table stays a plain table
    assert ("emb_l.0.weight_q" in keys) if "--qr-flag" in flags else ("emb_l.0.embs.weight" in keys)
