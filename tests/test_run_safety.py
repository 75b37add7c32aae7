"""What a run must never do to the user's files and numbers: write an output over an input or over
another output, go on after its loss turns NaN, save or load non-finite weights, or load a damaged
checkpoint or one saved with other function-changing flags. Each test is a case that went wrong
before these checks (data truncated, traceback, silent NaN training, silent corrupt load)."""
import json
import os
import struct
import zipfile

import pytest
import torch

import dlrm_s_pytorch
from dlrm.common import CheckpointError, NonFiniteError
from dlrm.run import benchmark, flags
from dlrm.run.checkpoint import MODEL_FLAGS_KEY, load_checkpoint, save_checkpoint
from helpers.criteo import fake_kaggle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = ["--mini-batch-size=2", "--data-size=6"]
KAGGLE = ["--arch-sparse-feature-size=4", "--arch-mlp-bot=13-8-4", "--arch-mlp-top=8-1", "--data-generation=dataset",
          "--data-set=kaggle", "--mini-batch-size=64", "--num-batches=2"]


def _one_error(code, err, *parts):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err


@pytest.fixture
def run(run_main, tmp_path):
    """run_main with the TensorBoard directory inside tmp_path."""
    def _run(*argv):
        return run_main(f"--tensor-board-filename={tmp_path}/tb", *argv)
    return _run


# --- no output over an input or over another output ------------------------------------------------


@pytest.fixture(scope="module")
def kaggle_dir(tmp_path_factory):
    """A preprocessed fake Kaggle data set (raw file, day files, processed file)."""
    directory = tmp_path_factory.mktemp("kaggle")
    fake_kaggle(directory / "train.txt", 700, seed=3)
    os.link(directory / "train.txt", directory / "linked.txt")
    code = dlrm_s_pytorch.main([*KAGGLE, f"--raw-data-file={directory}/train.txt",
                                f"--processed-data-file={directory}/proc.npz",
                                f"--tensor-board-filename={directory}/tb"])
    assert code == 0
    return directory


@pytest.mark.parametrize("flag", ["--metrics-file", "--save-model", "--onnx-file"])
@pytest.mark.parametrize("target, named", [
    ("train.txt", "--raw-data-file="), ("linked.txt", "--raw-data-file="),  # a hard link: same inode
    ("train_day_3_processed.npz", "(a preprocessed file of --raw-data-file)"),
    ("proc.npz", "--processed-data-file="), ("proc.npz.provenance.json", "(a provenance record of"),
])
def test_no_output_overwrites_the_data(run, kaggle_dir, flag, target, named):
    path = kaggle_dir / target
    before = path.read_bytes()
    extra = ["--save-onnx"] if flag == "--onnx-file" else []
    code, out, err = run(*KAGGLE, *extra, f"--raw-data-file={kaggle_dir}/train.txt",
                         f"--processed-data-file={kaggle_dir}/proc.npz", f"{flag}={path}")
    _one_error(code, err, f"{flag}={path} is the same file as", named, "it would overwrite an input")
    assert "Finished" not in out and path.read_bytes() == before


def test_no_output_overwrites_a_trace_file_or_the_loaded_checkpoint(run, tmp_path):
    dist = tmp_path / "dist_emb_1.log"
    dist.write_text("1 2 3\n0.5 0.3 0.2\n")
    code, _, err = run(*SMALL, "--data-generation=synthetic", f"--data-trace-file={tmp_path}/dist_emb_j.log",
                       f"--save-model={dist}")
    _one_error(code, err, f"--save-model={dist} is the same file as", "(a distribution file of --data-trace-file)")
    model = tmp_path / "m.pt"
    assert run(*SMALL, f"--save-model={model}")[0] == 0
    before = model.read_bytes()
    code, _, err = run(*SMALL, f"--load-model={model}", f"--metrics-file={model}")
    _one_error(code, err, f"--metrics-file={model} is the same file as --load-model={model}")
    assert model.read_bytes() == before


@pytest.mark.parametrize("dist, synthetic, message", [
    ("d.log", "trace.log", "--synthetic-file={t}/trace.log is the same file as --trace-file={t}/trace.log"),
    ("trace.log", "s.log", "--dist-file={t}/trace.log is the same file as --trace-file={t}/trace.log"),
    ("d.log", "d.log", "--synthetic-file={t}/d.log is the same file as --dist-file={t}/d.log"),
])
def test_the_trace_tool_never_overwrites_its_trace(capsys, tmp_path, dist, synthetic, message):
    from dlrm.data.synthetic_trace import trace_main

    trace = tmp_path / "trace.log"
    trace.write_text("1, 2, 3, 4, 1, 2, 5, 1\n")
    code = trace_main([f"--trace-file={trace}", f"--dist-file={tmp_path}/{dist}",
                       f"--synthetic-file={tmp_path}/{synthetic}", "--no-progress"])
    _one_error(code, capsys.readouterr().err, message.format(t=tmp_path))
    assert trace.read_text() == "1, 2, 3, 4, 1, 2, 5, 1\n" and sorted(os.listdir(tmp_path)) == ["trace.log"]


def test_resuming_from_and_saving_to_one_checkpoint_is_allowed(run, tmp_path):
    model = tmp_path / "m.pt"
    assert run(*SMALL, f"--save-model={model}")[0] == 0
    code, out, err = run(*SMALL, "--nepochs=2", "--fix-reference-bugs", f"--load-model={model}",
                         f"--save-model={model}")
    assert code == 0, err
    assert load_checkpoint(str(model))["epoch"] == 1


@pytest.mark.parametrize("first, second", [("--metrics-file", "--save-model"), ("--save-model", "--onnx-file"),
                                           ("--tensor-board-filename", "--save-model")])
def test_two_outputs_on_one_file_are_refused(run_main, tmp_path, first, second):
    path = tmp_path / "out"
    extra = ["--save-onnx"] if "--onnx-file" in (first, second) else []
    tb = [] if "--tensor-board-filename" in (first, second) else [f"--tensor-board-filename={tmp_path}/tb"]
    code, out, err = run_main(*SMALL, *extra, *tb, f"{first}={path}", f"{second}={path}")
    _one_error(code, err, f"={path} is the same file as", "both would be written there")
    assert not path.exists()


def test_the_tensorboard_directory_is_checked_at_start_up(run_main, tmp_path):
    pytest.importorskip("tensorboard")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, out, err = run_main(*SMALL, f"--tensor-board-filename={blocker}")
    _one_error(code, err, f"--tensor-board-filename={blocker} is a file, not a directory")
    code, out, err = run_main(*SMALL, f"--tensor-board-filename={blocker}/runs")
    _one_error(code, err, f"--tensor-board-filename={blocker}/runs is inside {blocker}, which is a file")
    assert "Using CPU" not in out and blocker.read_text() == "x"


def test_a_tensorboard_directory_spoiled_after_start_up_is_a_warning(tmp_path):
    pytest.importorskip("tensorboard")
    from dlrm.outputs.side_channels import make_writer

    (tmp_path / "tb").write_text("x")  # a file where the directory was to be
    lines = []
    assert make_writer(str(tmp_path / "tb"), lines.append) is None
    assert lines[-1].startswith("warning: TensorBoard: cannot write to") and lines[-1].endswith("continuing without it")


def test_stale_save_model_temporaries_are_removed_at_start(run, tmp_path):
    model = tmp_path / "m.pt"
    stale = tmp_path / "m.pt.12345-0123abcd.tmp"  # what a save killed midway leaves
    stale.write_bytes(b"x" * 1000)
    unrelated = tmp_path / "m.pt.backup"
    unrelated.write_bytes(b"y")
    code, out, err = run(*SMALL, f"--save-model={model}")
    assert code == 0, err
    assert not stale.exists() and unrelated.exists() and model.exists()
    assert f"removed {stale}" in err


# --- non-finite numbers ---------------------------------------------------------------------------------


NON_NEGATIVE_FLOATS = {"--learning-rate", "--md-temperature", "--rand-data-sigma", "--data-sub-sample-rate",
                       "--mlperf-acc-threshold", "--mlperf-auc-threshold", "--embedding-cache-gib"}


def _float_cases():
    float_flags = [a.option_strings[0] for a in flags.build_parser()._actions if a.type is float]
    assert NON_NEGATIVE_FLOATS < set(float_flags) and len(float_flags) == 14
    for flag in float_flags:
        yield flag, "nan", "must be a finite number"
        yield flag, "inf", "must be a finite number"
        if flag in NON_NEGATIVE_FLOATS:
            yield flag, "-0.5", "must not be negative"
    yield "--loss-weights", "1.0-nan", "must be a finite number"


@pytest.mark.parametrize("flag, value, message", list(_float_cases()))
def test_non_finite_and_negative_float_flags_are_refused(run, flag, value, message):
    code, out, err = run(*SMALL, f"{flag}={value}")
    _one_error(code, err, f"{flag} {message}")
    assert "Finished" not in out


@pytest.mark.parametrize("extra, where", [
    ([], "the training loss became nan at it 2/6 of epoch 0"),
    (["--print-freq=4"], "the training loss became nan at it 2/6 of epoch 0"),  # found among the 4 kept
    (["--loss-function=bce", "--round-targets=true"], "the predictions became nan at it 2/6 of epoch 0"),
])
def test_a_loss_that_turns_nan_stops_the_run_naming_the_iteration(run, tmp_path, extra, where):
    metrics = tmp_path / "m.jsonl"
    code, out, err = run("--mini-batch-size=2", "--data-size=12", "--learning-rate=1e30", f"--metrics-file={metrics}",
                         *extra)
    _one_error(code, err.splitlines()[-1] + "\n", where, "training stopped")
    assert "nan" not in out  # the reference prints "loss nan" for the rest of the run
    if not extra:
        assert out.splitlines()[-1] == "Finished training it 1/6 of epoch 0, -1.00 ms/it, loss 0.025266"
        assert len(metrics.read_text().splitlines()) == 1


def test_past_the_kept_losses_the_stop_names_a_range(run, monkeypatch):
    from dlrm.run import parts

    monkeypatch.setattr(parts, "LOSS_WINDOW", 1)  # only the first step's loss is kept
    code, out, err = run("--mini-batch-size=2", "--data-size=12", "--learning-rate=1e30", "--print-freq=4")
    _one_error(code, err.splitlines()[-1] + "\n", "the training loss became nan within its 2-4/6 of epoch 0")


def test_a_diverged_run_keeps_the_good_checkpoint_and_names_it(run, tmp_path, monkeypatch):
    from dlrm.run import train as dlrm_train

    step = dlrm_train.train_step

    def diverging_at_it_4(parts, cfg, batch, j):  # a loss that turns NaN in the fourth step
        loss = step(parts, cfg, batch, j)
        return loss * float("nan") if j == 3 else loss

    monkeypatch.setattr(dlrm_train, "train_step", diverging_at_it_4)
    model = tmp_path / "m.pt"
    code, out, err = run("--mini-batch-size=2", "--data-size=12", "--test-freq=1", "--loss-function=bce",
                         "--round-targets=true", f"--save-model={model}")
    _one_error(code, err.splitlines()[-1] + "\n", "the training loss became nan at it 4/6 of epoch 0",
               f"the checkpoint {model} is kept")
    assert "Saving model to" in out and load_checkpoint(str(model))["iter"] <= 3


def test_nan_test_predictions_are_one_line_under_mlperf_logging(run, tmp_path, monkeypatch):
    from dlrm.outputs import mlperf_logger

    real = mlperf_logger.make_mlperf_logger  # its log, dlrm.log, in tmp_path
    monkeypatch.setattr(benchmark, "make_mlperf_logger",
                        lambda enabled, log_file=None: real(enabled, log_file=str(tmp_path / "dlrm.log")))
    code, out, err = run("--mini-batch-size=2", "--data-size=12", "--learning-rate=1e30", "--test-freq=1",
                         "--loss-function=bce", "--round-targets=true", "--mlperf-logging")
    _one_error(code, err.splitlines()[-1] + "\n", "the test predictions became nan at it 1/6 of epoch 0")
    assert "Traceback" not in err  # scikit-learn's "Input y_pred contains NaN" before


def _saved(run, tmp_path, *flags):
    model = tmp_path / "m.pt"
    code, _, err = run(*SMALL, f"--save-model={model}", *flags)
    assert code == 0, err
    return model


def test_non_finite_weights_are_never_saved_over_a_good_checkpoint(run, tmp_path):
    model = _saved(run, tmp_path)
    before = model.read_bytes()
    payload = load_checkpoint(str(model))
    payload["state_dict"]["top_l.0.weight"][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"not saving to .*: top_l.0.weight holds NaN or infinite values.* the "
                                             "checkpoint there is kept"):
        save_checkpoint(str(model), payload)
    assert model.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_with_non_finite_weights_is_refused_at_load(run, tmp_path):
    model = _saved(run, tmp_path)
    payload = load_checkpoint(str(model))
    payload["state_dict"]["emb_l.1.weight"][2, 0] = float("nan")
    torch.save(payload, model)  # as a diverged run of the reference would have saved it
    code, out, err = run(*SMALL, f"--load-model={model}")
    _one_error(code, err, f"{model}: emb_l.1.weight holds NaN or infinite values")
    assert "Finished" not in out


# --- checkpoints are verified ---------------------------------------------------------------------------


def _entries(path):
    """name -> (offset of its data, size) for every entry of a stored (uncompressed) zip file."""
    data = path.read_bytes()
    out = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
            out[info.filename.split("/", 1)[1]] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def _named_tensors(value, prefix=""):
    """{dotted name: tensor} of every tensor in a loaded checkpoint."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    out = {}
    for key, item in items:
        out.update(_named_tensors(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def test_a_bit_flip_in_any_tensor_is_found_and_named(run, tmp_path):
    model = _saved(run, tmp_path, "--optimizer=adagrad")
    good = _named_tensors(torch.load(model, weights_only=True))
    flipped = tmp_path / "flipped.pt"
    entries = {name: where for name, where in _entries(model).items() if name.startswith("data/")}
    assert len(entries) == len(good) == 3 * 13  # 3 tables, 5 layers: 13 parameters, their sums and steps
    for entry, (offset, size) in entries.items():
        data = bytearray(model.read_bytes())
        data[offset + size - 1] ^= 0x40  # the high byte of a float32's last value: a large change
        flipped.write_bytes(bytes(data))
        silently = _named_tensors(torch.load(flipped, weights_only=True))  # torch's loader does not notice
        changed = [name for name, value in good.items() if not torch.equal(silently[name], value)]
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(str(flipped))
        assert str(caught.value) == (f"{flipped}: damaged: its entry {entry} (it holds {changed[0]}) fails its "
                                     "CRC-32 check (the file changed after it was written); use another copy")
        assert len(changed) == 1


def test_a_damaged_checkpoint_is_one_line_error(run, tmp_path):
    model = _saved(run, tmp_path)
    offset, size = _entries(model)["data/0"]
    data = bytearray(model.read_bytes())
    data[offset] ^= 1
    model.write_bytes(bytes(data))
    code, out, err = run(*SMALL, f"--load-model={model}")
    _one_error(code, err, f"{model}: damaged: its entry data/0 (it holds state_dict.emb_l.0.weight) fails its "
                          "CRC-32 check")


@pytest.mark.parametrize("saved_with, loaded_with, flag", [
    ([], ["--activation-function=tanh"], "--activation-function"),
    ([], ["--arch-interaction-op=cat", "--arch-mlp-top=4-2-1"], "--arch-interaction-op"),
    ([], ["--arch-interaction-itself"], "--arch-interaction-itself"),
    (["--weighted-pooling=fixed"], ["--weighted-pooling=learned"], "--weighted-pooling"),
    ([], ["--loss-threshold=0.1"], "--loss-threshold"),
    (["--qr-flag", "--qr-threshold=2"], ["--qr-flag", "--qr-threshold=2", "--qr-operation=add"], "--qr-operation"),
    (["--md-flag", "--md-threshold=2"], ["--md-flag", "--md-threshold=2", "--md-temperature=0.31"],
     "--md-temperature"),
])
def test_a_load_with_other_function_changing_flags_is_refused(run, tmp_path, saved_with, loaded_with, flag):
    model = _saved(run, tmp_path, *saved_with)
    code, out, err = run(*SMALL, f"--load-model={model}", *loaded_with)
    _one_error(code, err, f"{model}: saved with {flag}=", f"and this run has {flag}=")
    code, out, err = run(*SMALL, f"--load-model={model}", *saved_with, "--loss-threshold=2")  # 2: no clamp, as saved
    assert code == 0, err


@pytest.mark.parametrize("saved_with, loaded_with", [
    (["--weighted-pooling=fixed"], []),  # weights of 1: the same function
    (["--qr-flag", "--qr-operation=add"], []),  # no table above --qr-threshold (200): plain tables
    (["--loss-threshold=0"], ["--loss-threshold=-1"]),  # no clamp either way
])
def test_flags_that_change_nothing_here_do_not_refuse_a_load(run, tmp_path, saved_with, loaded_with):
    model = _saved(run, tmp_path, *saved_with)
    code, out, err = run(*SMALL, f"--load-model={model}", *loaded_with)
    assert code == 0, err


def test_the_flags_record_is_plain_data_and_optional(run, tmp_path):
    model = _saved(run, tmp_path, "--activation-function=sigmoid")
    payload = load_checkpoint(str(model))
    assert payload[MODEL_FLAGS_KEY]["activation_function"] == "sigmoid"
    json.dumps(payload[MODEL_FLAGS_KEY])  # numbers, strings and booleans only: any loader reads it
    del payload[MODEL_FLAGS_KEY]  # as the reference writes it
    torch.save(payload, model)
    code, out, err = run(*SMALL, f"--load-model={model}")  # loads as before, flags unchecked
    assert code == 0, err
