"""What a run writes besides its log lines, and the checks that it can write them.

:func:`check_outputs` runs at start-up, before any data is read or any table is built: every path a
run will write (checkpoint, ONNX file, metrics file, profiler traces, the compute graph, TensorBoard)
is checked to be a writable file location, so a mistyped path costs seconds, not the training time;
:func:`check_no_overwrites` refuses an output that is an input or another output.
The rest are the optional side channels: TensorBoard (one subdirectory per run), the profiler's
files and the compute graph.
"""
from __future__ import annotations

import datetime
import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch

from dlrm.checkpoints.chain import MANIFEST
from dlrm.common import ConfigError
from dlrm.io.atomic import atomic_open, atomic_path, remove_stale_temps, temp_name, writing
from dlrm.io.path_collisions import NamedFile, check_collisions

PROFILE_PREFIX = "dlrm_s_pytorch"
GRAPH_STEM = "dlrm_s_pytorch_graph"


@dataclass(frozen=True)
class OutputConfig:
    """What the run writes besides its log lines (paths as given on the command line)."""

    save_model: str = ""
    load_model: str = ""
    save_onnx: bool = False
    onnx_file: str = "dlrm_s_pytorch.onnx"
    enable_profiling: bool = False
    tensor_board_filename: str = "run_kaggle_pt"
    mlperf_logging: bool = False
    mlperf_log_file: str = ""
    plot_compute_graph: bool = False
    metrics_file: str = ""


def _written_paths(cfg: OutputConfig) -> List[Tuple[str, str]]:
    """List every file the run will create, as (flag, path)."""
    paths = [("--save-model", cfg.save_model), ("--metrics-file", cfg.metrics_file)]
    if cfg.save_onnx:
        paths.append(("--onnx-file", cfg.onnx_file))
    if cfg.enable_profiling:
        paths.append(("--enable-profiling", f"{PROFILE_PREFIX}_trace.json"))
    if cfg.plot_compute_graph:
        paths.append(("--plot-compute-graph", f"{GRAPH_STEM}.gv"))
    if cfg.mlperf_logging and cfg.mlperf_log_file:
        paths.append(("--mlperf-log-file", cfg.mlperf_log_file))
    return [(flag, path) for flag, path in paths if path]


def check_outputs(cfg: OutputConfig) -> None:
    """Raise ConfigError, naming the flag and the path, for any output the run could not write, and
    for a ``--load-model`` file (or checkpoint directory) that does not exist."""
    if cfg.load_model and not os.path.isfile(cfg.load_model):
        if os.path.isdir(cfg.load_model):  # a --checkpoint-dir, restored from its manifest's chain
            if not os.path.isfile(os.path.join(cfg.load_model, MANIFEST)):
                raise ConfigError(f"--load-model={cfg.load_model}: a directory without a checkpoint manifest "
                                  f"({MANIFEST})")
        else:
            raise ConfigError(f"--load-model={cfg.load_model}: checkpoint file not found")
    for flag, path in _written_paths(cfg):
        check_writable_file(flag, path)
    if tensorboard_directory(cfg):
        check_writable_directory("--tensor-board-filename", tensorboard_directory(cfg))


def tensorboard_directory(cfg: OutputConfig) -> str:
    """Where TensorBoard's run directories go; "" when tensorboard is not installed (then nothing is
    written there)."""
    if not cfg.tensor_board_filename or importlib.util.find_spec("tensorboard") is None:
        return ""
    return cfg.tensor_board_filename


def check_writable_directory(flag: str, path: str) -> None:
    """Check that ``path`` is a directory this process can create files in, or can be made one.

    Its nearest existing ancestor is a directory that can be written (checked with a temporary file)."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is" if existing == os.path.abspath(path) else f"is inside {existing}, which is"
        raise ConfigError(f"{flag}={path} {what} a file, not a directory")
    _probe_write(flag, path, temp_name(os.path.join(existing, ".dlrm-write-test")), existing)


def _probe_write(flag: str, path: str, probe: str, directory: str) -> None:
    """Create and remove the file ``probe``; a failure is a ConfigError naming ``flag`` and ``directory``."""
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"{flag}={path}: cannot write in {directory} ({exc.strerror or exc})") from None


# ---------------------------------------------------------------------------------------------
# No output over an input or over another output
# ---------------------------------------------------------------------------------------------

# (output flag, input flag) pairs that may name one file: a checkpoint is read whole before the
# run starts, and replaced atomically, so resuming from and saving to one file loses nothing.
SAME_FILE_ALLOWED = {("--save-model", "--load-model")}


def written_files(cfg: OutputConfig) -> List[NamedFile]:
    """Every file and directory the run writes whose name is known at start-up. The profiler's
    files are not among them: their names carry the time to the microsecond."""
    files = [NamedFile(flag, path) for flag, path in _written_paths(cfg)
             if flag not in ("--enable-profiling", "--plot-compute-graph")]
    if cfg.plot_compute_graph:
        files += [NamedFile("--plot-compute-graph", f"{GRAPH_STEM}{ext}", "the graph file") for ext in (".gv", ".pdf")]
    if tensorboard_directory(cfg):
        files.append(NamedFile("--tensor-board-filename", tensorboard_directory(cfg)))
    return files


def check_no_overwrites(cfg: OutputConfig, inputs: Sequence[NamedFile]) -> None:
    """Refuse, naming both flags, an output that is one of ``inputs`` or another output."""
    check_collisions(written_files(cfg), inputs, SAME_FILE_ALLOWED)


def remove_stale_outputs(cfg: OutputConfig) -> List[str]:
    """Remove the temporary files that an interrupted write of one of the run's outputs left (a
    save killed midway leaves ``<checkpoint>.<pid>-<hex>.tmp``, as large as the checkpoint);
    returns their names. Call it on the one process that writes them."""
    removed: List[str] = []
    for flag, path in _written_paths(cfg):
        with writing(path, label=flag, what="(removing a stale temporary file)"):
            removed += remove_stale_temps(path)
    return removed


def check_writable_file(flag: str, path: str) -> None:
    """Check that ``path`` names a file (not a directory) in an existing directory this process can write to.

    Checked by creating and removing a temporary file there."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag}={path} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise ConfigError(f"{flag}={path}: {parent} {what}")
    _probe_write(flag, path, temp_name(path), parent)


def make_writer(directory: str, log: Callable[[str], None]):
    """A TensorBoard SummaryWriter in a new subdirectory of ``directory`` (so runs do not merge),
    when tensorboard is installed; else None (it is never required)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    run = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f") + f"-{os.getpid()}"
    path = os.path.join(".", directory, run)
    log(f"TensorBoard: writing to {path}")
    try:
        return SummaryWriter(log_dir=path)
    except OSError as exc:  # checked at start-up; changed since
        log(f"warning: TensorBoard: cannot write to {path} ({exc.strerror or exc}); continuing without it")
        return None


@contextmanager
def profiling(enabled: bool, use_cuda: bool, log: Callable[[str], None]):
    """Run torch.profiler around the block, then write the reference's three files.

    They are the key averages by input shape and in total, and a Chrome trace, named
    ``dlrm_s_pytorch<time>...``."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        yield
    stamp = str(datetime.datetime.now()).replace(" ", "_")
    base = f"{PROFILE_PREFIX}{stamp}"
    sort_key = "self_cuda_time_total" if use_cuda else "self_cpu_time_total"
    names = [f"{base}_shape.prof", f"{base}_total.prof", f"{base}.json"]
    for name, table in zip(names, (prof.key_averages(group_by_input_shape=True), prof.key_averages())):
        with writing(name, label="--enable-profiling", what=os.path.abspath(name)), atomic_open(name, "w") as f:
            f.write(table.table(sort_by=sort_key))
    with writing(names[2], label="--enable-profiling", what=os.path.abspath(names[2])):
        with atomic_path(names[2], suffix=".json") as tmp:
            prof.export_chrome_trace(tmp)
    log("profiler: wrote " + ", ".join(names))


def draw_compute_graph(output: torch.Tensor, model: torch.nn.Module, log: Callable[[str], None]) -> List[str]:
    """The autograd graph of ``output`` (a loss or the predictions) as ``dlrm_s_pytorch_graph.gv``,
    and a PDF when Graphviz's ``dot`` is installed. Never raises: problems are one line in ``log``."""
    from dlrm.outputs.compute_graph import write_compute_graph

    return write_compute_graph(output, dict(model.named_parameters()), GRAPH_STEM, log)
