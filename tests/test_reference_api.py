"""The reference's Python API (``DLRM_Net``, ``dp.make_random_data_and_loader`` ...), used the way
MLPerf Inference's backend and research scripts use it: seed NumPy's global generator, build the
model from NumPy arrays, load a checkpoint, run batches. Each test compares with the numbers the
reference prints, a plain NumPy re-statement written here, or our command line's run."""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dlrm_data_pytorch as dp
from dlrm.common import ConfigError
from dlrm.model.dlrm import DLRM
from dlrm.run import flags as run_flags
from dlrm_s_pytorch import DLRM_Net
from helpers.criteo import fake_kaggle

ROOT = Path(__file__).resolve().parents[1]

LOSS = re.compile(r"^Finished training it \d+/\d+ of epoch \d+, -1\.00 ms/it, loss (\d+\.\d{6})$", re.M)
ACCURACY = re.compile(r"^ accuracy (\d+\.\d{3}) %", re.M)


# ---------------------------------------------------------------------------------------------
# A research script, written as such scripts are (NumPy arrays, the global generator, SGD)
# ---------------------------------------------------------------------------------------------


def reference_sizes(arch_embedding_size, arch_mlp_bot, arch_mlp_top, op="dot", itself=False):
    """ln_emb, ln_bot, ln_top as the reference's script computes them from its flags."""
    ln_emb = np.fromstring(arch_embedding_size, dtype=int, sep="-")
    ln_bot = np.fromstring(arch_mlp_bot, dtype=int, sep="-")
    num_fea = ln_emb.size + 1
    m_den_out = ln_bot[ln_bot.size - 1]
    if op == "dot":
        num_int = (num_fea * (num_fea + 1)) // 2 + m_den_out if itself else (num_fea * (num_fea - 1)) // 2 + m_den_out
    else:
        num_int = num_fea * m_den_out
    ln_top = np.fromstring(str(num_int) + "-" + arch_mlp_top, dtype=int, sep="-")
    return ln_emb, ln_bot, ln_top


def script_train(dlrm, loader, lr, print_freq):
    """The reference's loop: forward, loss, zero_grad, backward, step; the printed mean losses
    (accumulated in float32, as the reference does), formatted as it prints them."""
    optimizer = torch.optim.SGD(dlrm.parameters(), lr=lr)
    printed, total_loss, total_samp = [], 0, 0
    for j, (X, lS_o, lS_i, T) in enumerate(loader):
        Z = dlrm(dense_x=X, lS_o=lS_o, lS_i=lS_i)
        E = dlrm.loss_fn(Z, T)
        optimizer.zero_grad()
        E.backward()
        optimizer.step()
        L = E.detach().cpu().numpy()
        total_loss += L * X.shape[0]
        total_samp += X.shape[0]
        if (j + 1) % print_freq == 0 or j + 1 == len(loader):
            printed.append(f"{total_loss / total_samp:.6f}")
            total_loss, total_samp = 0, 0
    return printed


def random_args(**flags):
    base = dict(mini_batch_size=2, data_size=6, numpy_rand_seed=123, num_workers=0)
    base.update(flags)
    return argparse.Namespace(**base)


def default_model(loss_function="mse", **kwargs):
    ln_emb, ln_bot, ln_top = reference_sizes("4-3-2", "4-3-2", "4-2-1")
    return DLRM_Net(2, ln_emb, ln_bot, ln_top, arch_interaction_op="dot", arch_interaction_itself=False,
                    sigmoid_bot=-1, sigmoid_top=ln_top.size - 2, loss_function=loss_function, **kwargs)


def test_script_prints_the_reference_losses_and_our_cli_agrees(run_main, tmp_path):
    np.random.seed(123)
    _, train_ld, _, _ = dp.make_random_data_and_loader(random_args(), np.array([4, 3, 2]), 4)
    dlrm = default_model()
    # the reference's first initial rows (its recorded run, printed to 5 digits)
    np.testing.assert_allclose(dlrm.emb_l[0].weight[0].detach(), [0.19647, -0.21386], atol=5e-6)
    np.testing.assert_allclose(dlrm.bot_l[0].weight[0].detach(), [1.17912, 1.16889, 0.53669, 0.20643], atol=5e-6)
    np.testing.assert_allclose(dlrm.top_l[4].bias.detach(), [-1.21252], atol=5e-6)
    losses = script_train(dlrm, train_ld, lr=0.01, print_freq=1)
    assert losses == ["0.025266", "0.180494", "0.083240"]
    code, out, err = run_main("--mini-batch-size=2", "--data-size=6", f"--tensor-board-filename={tmp_path / 'tb'}")
    assert code == 0, err
    assert LOSS.findall(out) == losses


def test_reading_the_data_before_building_the_model_gives_the_debug_mode_numbers():
    """The reference's debug mode reads every batch before it builds the model: the model's draws
    then continue the data's stream."""
    np.random.seed(123)
    _, train_ld, _, _ = dp.make_random_data_and_loader(random_args(), np.array([4, 3, 2]), 4)
    batches = list(train_ld)
    dlrm = default_model()
    np.testing.assert_allclose(dlrm.emb_l[0].weight.detach()[:2], [[-0.34693, 0.19553], [-0.18123, 0.19197]],
                               atol=5e-6)
    np.testing.assert_allclose(batches[0][0], [[0.6965, 0.2861, 0.2269, 0.5513], [0.7195, 0.4231, 0.9808, 0.6848]],
                               atol=5e-5)
    assert script_train(dlrm, train_ld, lr=0.01, print_freq=1) == ["0.018993", "0.029700", "0.049903"]


# ---------------------------------------------------------------------------------------------
# Initial parameters: NumPy's global generator, the reference's order
# ---------------------------------------------------------------------------------------------


def plain_initial_parameters(seed, ln_emb, m_spa, ln_bot, ln_top):
    """The reference's draws, restated: np.random.seed, every table uniform(+-sqrt(1/n)), then every
    Linear (bottom, then top) weight normal(0, sqrt(2/(m+n))) and bias normal(0, sqrt(1/m))."""
    np.random.seed(seed)
    params = {}
    for k, n in enumerate(ln_emb):
        bound = np.sqrt(1 / n)
        params[f"emb_l.{k}.weight"] = np.random.uniform(-bound, bound, size=(n, m_spa)).astype(np.float32)
    for name, ln in (("bot_l", ln_bot), ("top_l", ln_top)):
        for i in range(ln.size - 1):
            n, m = ln[i], ln[i + 1]
            weight = np.random.normal(0.0, np.sqrt(2 / (m + n)), size=(m, n))
            params[f"{name}.{2 * i}.weight"] = weight.astype(np.float32)
            params[f"{name}.{2 * i}.bias"] = np.random.normal(0.0, np.sqrt(1 / m), size=m).astype(np.float32)
    return params


def test_initial_parameters_are_the_reference_draws_from_the_global_generator():
    # table 0 is large enough (40,000 values) for the native uniform kernel
    ln_emb, ln_bot, ln_top = reference_sizes("20000-7-1-30", "5-6-2", "6-3-1", op="cat")
    expected = plain_initial_parameters(7, ln_emb, 2, ln_bot, ln_top)
    after_plain = np.random.random_sample(3)
    np.random.seed(7)
    dlrm = DLRM_Net(2, ln_emb, ln_bot, ln_top, arch_interaction_op="cat", sigmoid_top=ln_top.size - 2)
    state = dlrm.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], torch.from_numpy(value)), key
    # the global generator moved exactly as far as the plain draws
    np.testing.assert_array_equal(np.random.random_sample(3), after_plain)


def cli_model(*flags):
    """The model our command line builds for ``flags`` (random data: built right after the seed)."""
    cfg = run_flags.config_from_args(run_flags.build_parser().parse_args(list(flags)))
    torch.manual_seed(cfg.system.seed)
    return DLRM(cfg.model, np.random.RandomState(cfg.system.seed))


@pytest.mark.parametrize("flags, options", [
    ([], {}),
    (["--arch-interaction-itself"], dict(itself=True)),
    (["--weighted-pooling=learned"], dict(weighted_pooling="learned")),
    (["--qr-flag", "--qr-threshold=3", "--qr-collisions=2"], dict(qr_flag=True, qr_threshold=3, qr_collisions=2)),
    (["--md-flag", "--md-threshold=2", "--arch-embedding-size=40-3-900"], dict(md_flag=True, md_threshold=2)),
])
def test_same_model_as_our_run_from_the_same_seed(flags, options):
    tables = next((f.split("=")[1] for f in flags if f.startswith("--arch-embedding-size")), "4-3-2")
    itself = options.pop("itself", False)
    ln_emb, ln_bot, ln_top = reference_sizes(tables, "4-3-2", "4-2-1", itself=itself)
    m_spa = 2
    if options.get("md_flag"):
        from dlrm.model.md_embedding_bag import md_solver

        m_spa = md_solver(torch.tensor(ln_emb), 0.3, d0=2, round_dim=False)
    ours = cli_model("--numpy-rand-seed=5", *flags).state_dict()
    np.random.seed(5)
    torch.manual_seed(5)  # QR and mixed-dimension tables draw from torch's generator, in both
    dlrm = DLRM_Net(m_spa, ln_emb, ln_bot, ln_top, arch_interaction_itself=itself, sigmoid_top=ln_top.size - 2,
                    qr_collisions=options.pop("qr_collisions", 0), **options)
    state = dlrm.state_dict()
    assert list(state) == list(ours)
    for key in ours:
        assert torch.equal(state[key], ours[key]), key
    if options.get("weighted_pooling"):
        assert [k for k in state if k.startswith("v_W_l.")] == ["v_W_l.0", "v_W_l.1", "v_W_l.2"]


def test_sigmoid_layers_are_placed_as_asked():
    ln_emb, ln_bot, ln_top = reference_sizes("4-3-2", "4-3-2", "4-2-1")
    default = DLRM_Net(2, ln_emb, ln_bot, ln_top)  # the reference's defaults: -1, no Sigmoid anywhere
    assert [type(m).__name__ for m in default.top_l] == ["Linear", "ReLU"] * 3
    dlrm = DLRM_Net(2, ln_emb, ln_bot, ln_top, sigmoid_bot=0, sigmoid_top=ln_top.size - 2)
    assert [type(m).__name__ for m in dlrm.bot_l] == ["Linear", "Sigmoid", "Linear", "ReLU"]
    assert [type(m).__name__ for m in dlrm.top_l] == ["Linear", "ReLU", "Linear", "ReLU", "Linear", "Sigmoid"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(ln_bot=np.array([4, 3, 3])), "ln_bot ends in 3"),
    (dict(ln_top=np.array([9, 4, 1])), "ln_top starts with 9"),
    (dict(arch_interaction_op="sum"), "arch_interaction_op='sum'"),
    (dict(loss_function="hinge"), "loss_function='hinge'"),
    (dict(qr_flag=True), "qr_collisions >= 1"),
])
def test_sizes_that_cannot_work_are_refused_at_construction(kwargs, message):
    args = dict(m_spa=2, ln_emb=np.array([4, 3, 2]), ln_bot=np.array([4, 3, 2]), ln_top=np.array([8, 4, 1]))
    args.update(kwargs)
    with pytest.raises(ConfigError, match=re.escape(message)):
        DLRM_Net(**args)


# ---------------------------------------------------------------------------------------------
# Outputs: a checkpoint from --save-model, loaded and run as MLPerf's backend does
# ---------------------------------------------------------------------------------------------


def plain_forward(state, X, lS_o, lS_i):
    """The reference's forward, restated in float64 NumPy: ReLU bottom MLP, sum-pooled bags, the
    dot interaction's strictly lower triangle row by row after x, ReLU top MLP with a Sigmoid last."""
    def mlp(prefix, x, sigmoid_last):
        layers = sorted({int(k.split(".")[1]) for k in state if k.startswith(prefix)})
        for i, layer in enumerate(layers):
            x = x @ state[f"{prefix}.{layer}.weight"].T + state[f"{prefix}.{layer}.bias"]
            x = 1 / (1 + np.exp(-x)) if (sigmoid_last and i == len(layers) - 1) else np.maximum(x, 0)
        return x

    x = mlp("bot_l", X.astype(np.float64), False)
    features = [x]
    for k in range(len(lS_i)):
        table, ends = state[f"emb_l.{k}.weight"], list(lS_o[k][1:]) + [len(lS_i[k])]
        features.append(np.stack([table[lS_i[k][s:e]].sum(axis=0) for s, e in zip(lS_o[k], ends)]))
    pairs = [[f_i @ f_j for i, f_i in enumerate(row) for f_j in row[:i]] for row in zip(*features)]
    return mlp("top_l", np.concatenate([x, np.array(pairs)], axis=1), True)


def test_checkpoint_saved_by_our_run_loads_and_gives_its_predictions(run_main, tmp_path):
    path = tmp_path / "model.pt"
    flags = ["--mini-batch-size=4", "--data-size=40", "--loss-function=bce", "--round-targets=true",
             "--learning-rate=0.1", "--print-freq=5", "--arch-embedding-size=9-5-7", "--test-freq=10"]
    code, out, err = run_main(*flags, f"--save-model={path}", f"--tensor-board-filename={tmp_path / 'tb'}")
    assert code == 0, err
    code, evaluated, err = run_main(*flags, f"--load-model={path}", "--inference-only",
                                    f"--tensor-board-filename={tmp_path / 'tb'}")
    assert code == 0, err

    args = random_args(mini_batch_size=4, data_size=40, round_targets=True, loss_function="bce")
    ln_emb, ln_bot, ln_top = reference_sizes("9-5-7", "4-3-2", "4-2-1")
    np.random.seed(args.numpy_rand_seed)
    _, train_ld, _, test_ld = dp.make_random_data_and_loader(args, ln_emb, ln_bot[0])
    dlrm = DLRM_Net(2, ln_emb, ln_bot, ln_top, sigmoid_top=ln_top.size - 2, loss_function="bce")
    # training the script's model on the script's loader gives our run's printed losses and weights
    assert script_train(dlrm, train_ld, lr=0.1, print_freq=5) == LOSS.findall(out)
    saved = torch.load(path)["state_dict"]
    for key, value in dlrm.state_dict().items():
        assert torch.equal(value, saved[key]), key

    dlrm = DLRM_Net(2, ln_emb, ln_bot, ln_top, sigmoid_top=ln_top.size - 2, loss_function="bce")
    dlrm.load_state_dict(saved)
    state = {k: v.double().numpy() for k, v in saved.items()}
    correct = total = 0
    with torch.no_grad():
        for X, lS_o, lS_i, T in test_ld:
            Z = dlrm(dense_x=X, lS_o=lS_o, lS_i=lS_i)
            # float32 against float64: a handful of roundings of O(1) values through 3 small layers
            np.testing.assert_allclose(Z.numpy(), plain_forward(state, X.numpy(), lS_o.numpy(),
                                                                [i.numpy() for i in lS_i]), rtol=1e-5, atol=1e-6)
            correct += int((torch.round(Z) == T).sum())
            total += T.shape[0]
    assert ACCURACY.findall(evaluated) == [f"{100 * correct / total:3.3f}"]


def test_offsets_and_indices_in_either_form_give_the_same_output():
    np.random.seed(3)
    dlrm = default_model()
    offsets = torch.tensor([[0, 2, 3], [0, 1, 2], [0, 2, 4]])
    indices = [torch.tensor([0, 3, 1, 2]), torch.tensor([2, 0, 1, 1]), torch.tensor([1, 0, 0, 1])]
    X = torch.rand(3, 4)
    with torch.no_grad():
        expected = dlrm(X, offsets, indices)
        assert torch.equal(dlrm(dense_x=X, lS_o=list(offsets), lS_i=indices), expected)
        assert torch.equal(dlrm(dense_x=X, lS_o=offsets, lS_i=torch.stack(indices)), expected)
        assert torch.equal(dlrm(dense_x=X, lS_o=list(offsets), lS_i=torch.stack(indices)), expected)
        state = {k: v.double().numpy() for k, v in dlrm.state_dict().items()}
        np.testing.assert_allclose(expected.numpy(), plain_forward(state, X.numpy(), offsets.numpy(),
                                                                   [i.numpy() for i in indices]), rtol=1e-5, atol=1e-6)
        # the reference's helpers, step by step
        ly = dlrm.apply_emb(offsets, indices, dlrm.emb_l, None)
        z = dlrm.interact_features(dlrm.apply_mlp(X, dlrm.bot_l), ly)
        assert torch.equal(dlrm.apply_mlp(z, dlrm.top_l), expected)


# ---------------------------------------------------------------------------------------------
# Batches: the random loader against our run's batches, the Criteo loaders against our run
# ---------------------------------------------------------------------------------------------


def assert_same_batch(actual, expected):
    assert torch.equal(actual[0], expected.dense_x)
    assert torch.equal(actual[1], expected.offsets)
    assert len(actual[2]) == len(expected.indices)
    for a, e in zip(actual[2], expected.indices):
        assert torch.equal(a, e)
    assert torch.equal(actual[3], expected.labels)


def our_random_batches(*flags):
    """Two epochs of our run's training batches for ``flags``."""
    cfg = run_flags.config_from_args(run_flags.build_parser().parse_args(list(flags)))
    _, loader, _, _ = dp.make_random_data_and_loaders(cfg.data, np.random.RandomState(cfg.system.seed), print)
    return list(loader) + list(loader)


@pytest.mark.parametrize("workers", [0, 1])
def test_random_loader_yields_our_runs_batches(workers):
    flags = ["--mini-batch-size=5", "--data-size=23", "--arch-embedding-size=30-4-100", "--arch-mlp-bot=3-2",
             "--num-indices-per-lookup=6", "--numpy-rand-seed=9"]
    expected = our_random_batches(*flags)
    args = random_args(mini_batch_size=5, data_size=23, arch_embedding_size="30-4-100", arch_mlp_bot="3-2",
                       num_indices_per_lookup=6, numpy_rand_seed=9, num_workers=workers)
    train_data, train_ld, test_data, test_ld = dp.make_random_data_and_loader(args, np.array([30, 4, 100]), 3)
    assert len(train_ld) == len(test_ld) == len(train_data) == 5
    actual = list(train_ld) + list(train_ld)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_same_batch(a, e)
    for a, e in zip(test_ld, expected):  # the test data is the training data
        assert_same_batch(a, e)
    # the reference's collate, over the dataset's items
    assert_same_batch(dp.collate_wrapper_random_offset([train_data[0]]), expected[0])


def test_random_loader_reads_string_flags_and_refuses_what_it_cannot_honour():
    args = random_args(data_generation="dataset")
    with pytest.raises(ConfigError, match="data_generation random or synthetic"):
        dp.make_random_data_and_loader(args, np.array([4, 3, 2]), 4)
    with pytest.raises(ConfigError, match="fix_reference_bugs"):
        dp.make_random_data_and_loader(random_args(fix_reference_bugs=True), np.array([4, 3, 2]), 4)
    with pytest.raises(ConfigError, match="--num-indices-per-lookup-fixed"):
        dp.make_random_data_and_loader(random_args(num_indices_per_lookup_fixed="maybe"), np.array([4, 3, 2]), 4)
    fixed = dp.make_random_data_and_loader(random_args(num_indices_per_lookup_fixed="true",
                                                       num_indices_per_lookup="1"), np.array([4, 3, 2]), 4)
    assert all(len(i) == 2 for i in next(iter(fixed[1]))[2])  # one index per bag, 2 bags


KAGGLE = dict(arch_sparse_feature_size=4, arch_mlp_bot="13-8-4", arch_mlp_top="8-1", data_generation="dataset",
              data_set="kaggle", loss_function="bce", round_targets=True, learning_rate=0.1, mini_batch_size=32,
              print_freq=4, test_mini_batch_size=64, numpy_rand_seed=11, max_ind_range=300, num_workers=0,
              test_num_workers=0, memory_map=False, data_randomize="total")


def plain_criteo_collate(samples):
    """The reference's Criteo collate, restated: log(x + 1) dense, offsets 0..B-1 per table."""
    dense = torch.log(torch.tensor(np.array([s[0] for s in samples]), dtype=torch.float) + 1)
    indices = torch.tensor(np.array([s[1] for s in samples]), dtype=torch.long).t()
    offsets = torch.arange(len(samples)).repeat(indices.shape[0], 1)
    labels = torch.tensor(np.array([s[2] for s in samples]), dtype=torch.float32).view(-1, 1)
    return dense, offsets, indices, labels


def test_criteo_loaders_and_a_script_reproduce_our_run(run_main, tmp_path):
    raw = tmp_path / "train.txt"
    fake_kaggle(raw, 700, seed=5)
    files = dict(raw_data_file=str(raw), processed_data_file=str(tmp_path / "kaggle_processed.npz"))
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in {**KAGGLE, **files}.items() if not isinstance(v, bool)]
    cli += ["--round-targets=true", f"--tensor-board-filename={tmp_path / 'tb'}"]
    code, out, err = run_main(*cli)
    assert code == 0, err

    args = argparse.Namespace(**KAGGLE, **files)
    np.random.seed(args.numpy_rand_seed)
    train_data, train_ld, test_data, test_ld = dp.make_criteo_data_and_loaders(args)
    ln_emb = np.array([min(c, args.max_ind_range) for c in train_data.counts])
    ln_bot = np.fromstring(args.arch_mlp_bot, dtype=int, sep="-")
    ln_bot[0] = train_data.m_den
    num_fea = ln_emb.size + 1
    ln_top = np.array([num_fea * (num_fea - 1) // 2 + ln_bot[-1], 8, 1])
    dlrm = DLRM_Net(args.arch_sparse_feature_size, ln_emb, ln_bot, ln_top, sigmoid_top=ln_top.size - 2,
                    loss_function=args.loss_function)
    # the loaders' batches are the reference's collate of the datasets' samples
    for loader, data, size in ((train_ld, train_data, 32), (test_ld, test_data, 64)):
        batches = list(loader)
        assert len(batches) == -(-len(data) // size)
        for k in (0, len(batches) - 1):
            samples = [data[i] for i in range(k * size, min((k + 1) * size, len(data)))]
            for a, e in zip(batches[k], plain_criteo_collate(samples)):
                assert torch.equal(a, e)
            for a, e in zip(dp.collate_wrapper_criteo_offset(samples), batches[k]):
                assert torch.equal(a, e)
    assert script_train(dlrm, train_ld, lr=args.learning_rate, print_freq=args.print_freq) == LOSS.findall(out)


# ---------------------------------------------------------------------------------------------
# The README's example
# ---------------------------------------------------------------------------------------------


def readme_library_example():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using it as a library", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_library_example_runs_and_prints_the_reference_losses(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", readme_library_example()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"loss (\d\.\d{6})", proc.stdout) == ["0.025266", "0.180494", "0.083240"]
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
