"""The private APIs of other libraries that the project relies on still exist and still behave as used.

One test per entry of the README's "Private APIs we rely on": each checks that the name is there,
that it takes the arguments the code passes, and (where cheap) that it does what the code counts
on. A failure names the API, so an upgrade that removes or changes one is caught here, not as a
strange error or a silent slowdown in a run.
"""
import argparse
import atexit
import concurrent.futures
import copy
import datetime
import importlib
import inspect
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from dlrm.cli import option_names
from dlrm.distributed import DistInfo, announce_failure, peer_failure
from dlrm.model import fast_numerics
from dlrm.run.checkpoint import load_checkpoint, save_checkpoint
from dlrm.run.flags import build_parser

README_SECTION = "see the README's 'Private APIs we rely on'"


def need(condition, api: str, what: str) -> None:
    """Fail, naming the private API, unless ``condition`` holds."""
    if not condition:
        pytest.fail(f"private API {api} changed: {what} ({README_SECTION})", pytrace=False)


def lookup(api: str, get):
    """``get()``, or a failure naming ``api`` when the name is gone."""
    try:
        return get()
    except (AttributeError, ImportError, RuntimeError) as error:
        pytest.fail(f"private API {api} is gone: {error} ({README_SECTION})", pytrace=False)


def test_argparse_actions_lists_every_option_with_its_settings():
    api = "argparse.ArgumentParser._actions"
    parser = argparse.ArgumentParser(prog="p")
    group = parser.add_argument_group("g")
    group.add_argument("--batch", dest="batch_size", type=int, default=1)
    parser.add_argument("--mode", choices=("a", "b"), default="a")
    actions = lookup(api, lambda: parser._actions)
    by_dest = {a.dest: a for a in actions}
    need({"help", "batch_size", "mode"} <= set(by_dest), api, "no longer lists the options of argument groups")
    batch = by_dest["batch_size"]
    need(batch.option_strings == ["--batch"] and batch.type is int and batch.nargs is None
         and batch.choices is None and batch.metavar is None, api, "an action's fields changed")
    batch.metavar = "BATCH_SIZE_SHOWN"  # what build_parser does to name values after the flag
    need("--batch BATCH_SIZE_SHOWN" in parser.format_help(), api, "a metavar set afterwards is not shown")
    names = option_names(build_parser())
    need(names.get("batch_size") == "--mini-batch-size", api, f"option_names gives {names.get('batch_size')!r}")


def test_mkldnn_linear_pointwise_is_linear_then_activation():
    api = "torch.ops.mkldnn._linear_pointwise"
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN: --fast-numerics uses MKL alone")
    op = lookup(api, lambda: torch.ops.mkldnn._linear_pointwise)
    need(fast_numerics._linear_pointwise is not None, api, "fast_numerics did not find it")
    schema = str(op.default._schema)
    need("(Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars, str? algorithm)" in schema, api,
         f"its arguments are now {schema}")
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen) for shape in ((8, 5), (3, 5), (3,)))
    plain = torch.addmm(b, x, w.t())
    for act, expected in (("none", plain), ("relu", plain.relu()), ("sigmoid", plain.sigmoid()),
                          ("tanh", plain.tanh())):
        got = op(x, w, b, act, [], "")
        need(torch.allclose(got, expected, rtol=1e-5, atol=1e-5), api, f"activation {act!r} gives other values")


def test_cpu_bf16_probes_answer_with_a_bool():
    answers = []
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        api = f"torch.cpu.{name}"
        probe = lookup(api, lambda: getattr(torch.cpu, name))
        need(not inspect.signature(probe).parameters, api, f"now takes arguments: {inspect.signature(probe)}")
        answers.append(probe())
        need(isinstance(answers[-1], bool), api, f"returned {answers[-1]!r}, not a bool")
    need(fast_numerics.has_native_bf16() == any(answers), "torch.cpu._is_*", "has_native_bf16 disagrees with them")


def test_has_native_bf16_names_the_probe_when_torch_drops_it(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    with pytest.raises(RuntimeError, match=r"torch\.cpu\._is_avx512_bf16_supported.*fast_numerics\.py"):
        fast_numerics.has_native_bf16()


def test_assert_async_passes_true_and_raises_its_message_on_false():
    api = "torch._assert_async"
    check = lookup(api, lambda: torch._assert_async)
    check(torch.tensor(True), "never shown")
    try:
        check(torch.tensor(False), "FusedTables: an index is out of range")
    except RuntimeError as error:
        need("an index is out of range" in str(error), api, f"raised {error!r} without the message")
    else:
        need(False, api, "no longer raises for a false CPU tensor")


def test_per_sample_weights_backward_matches_autograd():
    api = "torch.ops.aten._embedding_bag_per_sample_weights_backward"
    op = lookup(api, lambda: torch.ops.aten._embedding_bag_per_sample_weights_backward)
    schema = str(op.default._schema)
    need("(Tensor grad, Tensor weight, Tensor indices, Tensor offsets, Tensor offset2bag, int mode, "
         "int padding_idx=-1)" in schema, api, f"its arguments are now {schema}")
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 4, generator=gen)
    indices, offsets = torch.tensor([0, 5, 2, 2, 3]), torch.tensor([0, 2, 2])
    psw = torch.rand(5, generator=gen, requires_grad=True)
    grad = torch.randn(3, 4, generator=gen)
    F.embedding_bag(indices, weight, offsets, mode="sum", per_sample_weights=psw).backward(grad)
    no_offset2bag = torch.empty(0, dtype=torch.long)  # as fused_embedding passes it: torch derives it
    got = op(grad, weight, indices, offsets, no_offset2bag, 0, -1)
    need(torch.allclose(got, psw.grad, rtol=1e-6, atol=1e-6), api, "differs from autograd's gradient")


@pytest.mark.slow
def test_default_store_carries_a_failure_between_ranks(monkeypatch):
    api = "torch.distributed.distributed_c10d._get_default_store"
    get_store = lookup(api, lambda: torch_dist.distributed_c10d._get_default_store)
    need(not inspect.signature(get_store).parameters, api, "now takes arguments")
    importlib.import_module("torch.distributed.nn")  # before the group exists, as dlrm.distributed does

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    store = torch_dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=datetime.timedelta(seconds=30))
    torch_dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        default = get_store()
        need(hasattr(default, "set_timeout"), api, "its store has no set_timeout")
        first = peer_failure(DistInfo(rank=0, world_size=1), RuntimeError("gloo: connection closed"))
        announce_failure(DistInfo(rank=1, world_size=2))
        second = peer_failure(DistInfo(rank=0, world_size=1), RuntimeError("gloo: connection closed"))
    finally:
        torch_dist.destroy_process_group()
    need("another rank stopped" in str(first), api, f"a missing key read as {first}")
    need(str(second) == "rank 0: stopping because rank 1 failed", api, f"the failed rank is not passed on: {second}")


def _sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


@pytest.mark.slow
def test_process_pool_processes_maps_pids_to_killable_processes():
    api = "concurrent.futures.ProcessPoolExecutor._processes"
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=1)
    try:
        pid = pool.submit(_sleep, 0).result(timeout=60)
        processes = lookup(api, lambda: pool._processes)
        need(isinstance(processes, dict) and list(processes) == [pid], api, f"holds {processes!r}")
        process = processes[pid]
        need(process.pid == pid and callable(getattr(process, "kill", None)), api, "its values are not processes")
        slow = pool.submit(_sleep, 60)
        time.sleep(0.2)
        start = time.monotonic()
        process.kill()
        pool.shutdown(wait=True, cancel_futures=True)  # as dlrm's _stop_workers does
        need(time.monotonic() - start < 30, api, "killing its processes did not end the pool's work")
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            slow.result(timeout=30)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
def test_atexit_run_exitfuncs_runs_the_handlers_before_os_exit():
    api = "atexit._run_exitfuncs"
    lookup(api, lambda: atexit._run_exitfuncs)
    script = ("import atexit, os, sys\n"
              "atexit.register(lambda: sys.stdout.write('handler ran\\n'))\n"
              "atexit._run_exitfuncs()\n"
              "sys.stdout.flush()\n"
              "os._exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    need(proc.returncode == 3 and proc.stdout == "handler ran\n", api,
         f"exit {proc.returncode}, printed {proc.stdout!r}, {proc.stderr.strip()!r}")


@pytest.mark.slow
def test_generate_state_is_the_numpy_seed_of_dataloader_workers():
    api = "torch.utils.data._utils.worker._generate_state"

    def get():
        from torch.utils.data._utils.worker import _generate_state

        return _generate_state

    generate_state = lookup(api, get)
    need(list(inspect.signature(generate_state).parameters) == ["base_seed", "worker_id"], api,
         f"its arguments are now {inspect.signature(generate_state)}")
    seed = 1234
    base_seed = torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(seed)).item()
    loader = torch.utils.data.DataLoader(_Draws(), batch_size=None, num_workers=1,
                                         generator=torch.Generator().manual_seed(seed),
                                         multiprocessing_context="fork")
    drawn = next(iter(loader))
    expected = np.random.RandomState(generate_state(base_seed, 0)).randint(0, 2**31 - 1)
    need(int(drawn) == int(expected), api, "worker 0's NumPy generator is seeded otherwise")


class _Draws(torch.utils.data.Dataset):
    """One item: a draw from NumPy's global generator, in whichever process reads it."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return int(np.random.randint(0, 2**31 - 1))


def test_numpy_scalars_pickle_under_a_name_checkpoint_loading_allows(tmp_path):
    api = "numpy._core.multiarray.scalar (numpy.core.multiarray.scalar before NumPy 2)"
    pickled = pickle.dumps(np.float64(0.25), protocol=2)
    need(b"numpy._core.multiarray" in pickled or b"numpy.core.multiarray" in pickled, api,
         f"NumPy now pickles a scalar as {pickled[:60]!r}")
    path = str(tmp_path / "scalars.pt")
    save_checkpoint(path, {"state_dict": {"w": torch.zeros(1)}, "train_loss": np.float64(0.25),
                           "test_acc": np.float32(0.5)})
    loaded = load_checkpoint(path)
    need(loaded["train_loss"] == 0.25 and loaded["test_acc"] == 0.5, api, "a checkpoint's NumPy scalars do not load")


def test_module_modules_dict_can_be_replaced_on_a_shallow_copy():
    api = "torch.nn.Module._modules"
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    children = lookup(api, lambda: model._modules)
    need(isinstance(children, dict) and list(children) == ["0", "1"], api, f"holds {children!r}")
    shallow = copy.copy(model)
    shallow._modules = dict(model._modules)  # what with_per_table_layout and bench_inference do
    shallow._modules["1"] = nn.Identity()
    need(isinstance(model[1], nn.ReLU), api, "replacing the copy's child changed the original")
    need(isinstance(shallow[1], nn.Identity) and shallow[0] is model[0], api, "the copy does not use its own dict")
    x = torch.tensor([[-1.0, 1.0]])
    need(torch.equal(shallow(x), model[0](x)), api, "forward does not run the replaced child")


def test_embedding_bag_weight_argument_wraps_the_tensor_without_drawing():
    api = "torch.nn.EmbeddingBag(_weight=...)"
    need("_weight" in inspect.signature(nn.EmbeddingBag).parameters, api, "the argument is gone")
    weight = torch.arange(6.0).view(3, 2)
    before = torch.get_rng_state()
    bag = nn.EmbeddingBag(3, 2, mode="sum", sparse=True, _weight=weight)  # bench_fused_embedding's tables
    need(torch.equal(torch.get_rng_state(), before), api, "it draws an initialisation it then discards")
    need(bag.weight.data_ptr() == weight.data_ptr() and bag.weight.requires_grad, api,
         "the table is not the given tensor, trainable")
