"""torch.distributed set-up and the collectives of a run, without module-level state.

``init_distributed`` returns a frozen :class:`DistInfo`; a single process is simply
``DistInfo(rank=0, world_size=1, local_rank=0, backend=None)``, so single-process code runs the same
path. Nothing here patches ``print``: callers print through a rank-aware logger.

Multi-process runs follow the reference's hybrid layout: the embedding tables are split into
contiguous shards, one per rank (model parallel); every rank reads the whole global batch and looks
up its own tables for all of it; an all-to-all ("butterfly shuffle", :mod:`dlrm.shard.exchange`)
then gives each rank every table's output for its contiguous slice of the batch, on which it runs
the MLPs (data parallel). :mod:`dlrm.shard` also splits tables by rows or columns.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as torch_dist

from dlrm.common import ConfigError, DLRMError, first_line

_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "RANK")
_LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a run.

    Attributes:
        rank: global rank, 0-based.
        world_size: number of processes.
        local_rank: rank on this node.
        backend: the torch.distributed backend, or None for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        """True on the process that prints (rank 0)."""
        return self.rank == 0


def _env_setting(names, default: int) -> Tuple[str, int]:
    """The first of ``names`` set in the environment and its integer value (``("", default)`` if none)."""
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return name, int(value)
            except ValueError:
                raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None
    return "", default


def _env_int(names, default: int) -> int:
    return _env_setting(names, default)[1]


def world_size_from_env() -> int:
    """The world size that the launcher (torchrun, mpirun, ...) announces, 1 if none."""
    return _env_int(_SIZE_VARS, 1)


def init_distributed(local_rank: int = -1, use_gpu: bool = False, backend: str = "", timeout_s: float = 300.0,
                     log: Optional[Callable[[str], None]] = None) -> DistInfo:
    """Set up this process's place in the run.

    A launch with a world size of 1 (or none) needs no process group. Otherwise the process group
    is created with ``backend`` (default: nccl for GPUs, else gloo), ``MASTER_ADDR`` defaulting to
    127.0.0.1 and ``MASTER_PORT`` to 29500. Started by hand (not by torchrun), a process says at
    once where it waits for the others. Every way of failing to meet them (a rank out of range, a
    port in use, nobody listening, a listener that is not the run's) ends within ``timeout_s``
    seconds, which also bounds every collective, with one reason.

    Raises:
        ConfigError: malformed launcher variables, a rank out of range, ranks given different world
            sizes, or an unusable backend.
        DistributedError: the processes could not meet in time.
    """
    started = time.monotonic()
    size = world_size_from_env()
    rank_var, rank = _env_setting(_RANK_VARS, 0)
    if local_rank < 0:
        local_rank = _env_int(_LOCAL_RANK_VARS, 0)
    if size <= 1:
        return DistInfo(rank=rank, world_size=1, local_rank=max(local_rank, 0), backend=None)
    if not 0 <= rank < size:
        raise ConfigError(f"{rank_var}={rank} is out of range: a run of {size} processes has ranks 0 to {size - 1}")
    backend = backend or ("nccl" if use_gpu and torch.cuda.is_available() else "gloo")
    host, port = _master_address()
    if use_gpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if log is not None and "TORCHELASTIC_RUN_ID" not in os.environ:
        log(f"rank {rank}: waiting for all {size} processes at {host}:{port} (backend {backend}; giving up after "
            f"{timeout_s:g} s, --dist-init-timeout)")
    _import_group_capturing_modules()
    _form_group(_Meeting(host, port, rank, size, timeout_s, started + timeout_s), backend)
    return DistInfo(rank=rank, world_size=size, local_rank=local_rank, backend=backend)


def _form_group(meeting: "_Meeting", backend: str) -> None:
    """Create the default process group through the meeting's store (MPI meets through its own
    launcher), turning each way of failing into one reason."""
    store = None if backend == "mpi" else meeting.store()
    try:
        with _cpp_log_silenced():  # a page of c10d log per timeout; the error raised says what matters
            if store is not None:
                meeting.check_world_size(store)
            torch_dist.init_process_group(backend=backend, rank=meeting.rank, world_size=meeting.size, store=store,
                                          timeout=datetime.timedelta(seconds=meeting.timeout_s))
    except (torch_dist.DistStoreError, TimeoutError) as exc:
        raise meeting.not_joined(exc) from None
    except torch_dist.DistNetworkError as exc:
        raise DistributedError(f"rank {meeting.rank}: lost the connection to rank 0 at {meeting.address} before "
                               f"all {meeting.size} processes joined ({first_line(exc)})") from None
    except DLRMError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"--dist-backend={backend}: cannot start the process group ({first_line(exc)})") from None


def _master_address() -> Tuple[str, int]:
    """Read ``MASTER_ADDR`` and ``MASTER_PORT``, set to 127.0.0.1 and 29500 when not given (torch reads them too)."""
    host = os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    text = os.environ.setdefault("MASTER_PORT", "29500")
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"environment variable MASTER_PORT={text!r} is not a port number (1 to 65535)")
    return host, int(text)


@dataclass(frozen=True)
class _Meeting:
    """Where and until when the ranks meet: the rendezvous store, reached or served before a deadline."""

    host: str
    port: int
    rank: int
    size: int
    timeout_s: float
    deadline: float  # time.monotonic() by which the store must be there

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def serves(self) -> bool:
        """True on the process that serves the store: rank 0, unless torchrun's agent serves it."""
        return self.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"

    def store(self) -> torch_dist.Store:
        """The rendezvous store (served here, or reached at the master address), by the deadline.

        torch's client would retry a closed port with pages of C++ log, for twice the timeout, and
        would wait forever on a port that another program holds (it accepts and never answers), so
        a client first waits here until something accepts connections at the address, and gives
        the handshake only the time left.
        """
        if not self.serves():
            self.wait_for_listener()
        timeout = datetime.timedelta(seconds=self.timeout_s)

        def connect():
            store, _, _ = next(torch_dist.rendezvous("env://", rank=self.rank, world_size=self.size, timeout=timeout))
            store.set_timeout(timeout)
            return torch_dist.PrefixStore("default_pg", store)  # what init_process_group would make

        try:
            return _call_within(self.deadline - time.monotonic(), connect)
        except TimeoutError:
            if self.serves():
                raise self.not_joined(None) from None
            raise DistributedError(
                f"rank {self.rank}: something at {self.address} accepts connections but does not answer as this "
                f"run's rank 0 within {self.timeout_s:g} s (--dist-init-timeout): another program holds "
                f"MASTER_PORT={self.port}? Choose a free port for every rank") from None
        except torch_dist.DistNetworkError as exc:
            raise self.network_error(exc) from None
        except torch_dist.DistStoreError as exc:
            raise self.not_joined(exc) from None

    def check_world_size(self, store: torch_dist.Store) -> None:
        """Raise ConfigError when this rank and rank 0 (on rank 0: any rank) were given different
        world sizes: gloo would otherwise wait for ranks that do not exist, past the timeout."""
        store.set(f"{_WORLD_SIZE_KEY}/{self.rank}", str(self.size))
        store.set_timeout(datetime.timedelta(seconds=max(self.deadline - time.monotonic(), 0.1)))
        for other in (range(1, self.size) if self.rank == 0 else [0]):
            theirs = int(store.get(f"{_WORLD_SIZE_KEY}/{other}").decode())
            if self.rank != 0:
                store.set(f"{_WORLD_SIZE_KEY}/read/{self.rank}", "1")
            if theirs != self.size:
                if self.rank == 0:
                    self._let_read(store, range(1, other + 1))
                raise ConfigError(f"ranks disagree on WORLD_SIZE: rank {self.rank} has {self.size}, "
                                  f"rank {other} has {theirs}")
        store.set_timeout(datetime.timedelta(seconds=self.timeout_s))

    def _let_read(self, store: torch_dist.Store, ranks) -> None:
        """On rank 0, before it stops (taking the store with it): wait a little for ``ranks`` to have
        read its world size, so that each of them names the disagreement too, not a lost connection."""
        try:
            store.set_timeout(datetime.timedelta(seconds=min(5.0, max(self.deadline - time.monotonic(), 0.1))))
            store.wait([f"{_WORLD_SIZE_KEY}/read/{r}" for r in ranks])
        except (torch_dist.DistError, RuntimeError):
            pass  # a rank that does not read in time stops on the lost connection instead

    def wait_for_listener(self) -> None:
        """Return once something accepts connections at the master address; DistributedError, with
        the last reason, when nothing does by the deadline."""
        reason = "nobody is listening there"
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise DistributedError(
                    f"rank {self.rank}: cannot reach rank 0 at {self.address} within {self.timeout_s:g} s "
                    f"(--dist-init-timeout): {reason}; start rank 0 too, with the same MASTER_ADDR and MASTER_PORT")
            try:
                with socket.create_connection((self.host, self.port), timeout=min(left, 1.0)):
                    return
            except socket.gaierror as exc:
                raise ConfigError(f"environment variable MASTER_ADDR={self.host!r}: unknown host "
                                  f"({first_line(exc)})") from None
            except ConnectionRefusedError:
                reason = "nobody is listening there"
            except TimeoutError:
                reason = "connections go unanswered (a firewall, or an address that is not up?)"
            except OSError as exc:
                reason = first_line(exc)
            time.sleep(max(min(0.1, self.deadline - time.monotonic()), 0.0))

    def network_error(self, exc: BaseException) -> DistributedError:
        """The reason a store could not be served or reached, from torch's network error."""
        text = str(exc)
        if "EADDRINUSE" in text or "address already in use" in text.lower():
            return DistributedError(
                f"rank {self.rank}: cannot serve the rendezvous at {self.address}: port {self.port} is already in "
                "use (by another program or run); choose a free MASTER_PORT for every rank")
        return DistributedError(f"rank {self.rank}: cannot meet the other processes at {self.address} "
                                f"({first_line(exc)})")

    def not_joined(self, exc: Optional[BaseException]) -> DistributedError:
        """The error of a rank that met the store but not all the other processes in time."""
        detail = f" ({first_line(exc)})" if exc is not None else ""
        return DistributedError(
            f"rank {self.rank}: the other processes of the {self.size} did not join at {self.address} within "
            f"{self.timeout_s:g} s{detail}; start every rank with the same MASTER_ADDR, MASTER_PORT and "
            "WORLD_SIZE, or use torchrun")


@contextlib.contextmanager
def _cpp_log_silenced():
    """While the block runs, what C++ code writes to this process's stderr (file descriptor 2) goes
    nowhere; Python's own lines are flushed first."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _call_within(seconds: float, fn: Callable[[], object]) -> object:
    """Return ``fn()``, or raise TimeoutError when it has not returned within ``seconds``.

    It is then left running in a daemon thread, which cannot keep the process alive (C++ calls such
    as a store's handshake cannot be interrupted)."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="dlrm-rendezvous", daemon=True)
    thread.start()
    thread.join(max(seconds, 0.0))
    if thread.is_alive():
        raise TimeoutError(f"not done within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class DistributedError(DLRMError):
    """A multi-process run cannot go on: a peer never joined, failed or vanished."""


_FAILED_KEY = "dlrm_failed_rank"
_WORLD_SIZE_KEY = "dlrm_world_size"


def announce_failure(info: DistInfo) -> None:
    """Tell the other ranks, through the rendezvous store, that this rank is failing (best effort)."""
    try:
        torch_dist.distributed_c10d._get_default_store().set(_FAILED_KEY, str(info.rank))
    except Exception:  # the store may already be gone; the others then report a lost connection
        pass


def current_info() -> DistInfo:
    """This process's place, read back from torch.distributed (a single process when none)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return DistInfo()
    return DistInfo(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(),
                    local_rank=_env_int(_LOCAL_RANK_VARS, 0), backend=torch_dist.get_backend())


def is_collective_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when a peer has gone (torch's DistError, or gloo's and
    nccl's RuntimeErrors, which name the backend or the lost connection)."""
    if isinstance(exc, torch_dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(mark in text for mark in ("gloo", "NCCL", "nccl", "Connection"))


def peer_failure(info: DistInfo, exc: BaseException) -> DistributedError:
    """The one-line error of a rank whose collective failed because another rank stopped."""
    try:
        store = torch_dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=2))
        failed = store.get(_FAILED_KEY).decode()
        return DistributedError(f"rank {info.rank}: stopping because rank {failed} failed")
    except Exception:
        return DistributedError(f"rank {info.rank}: stopping because another rank stopped ({first_line(exc)})")


def _import_group_capturing_modules() -> None:
    """Import, before the process group exists, the torch modules that capture ``group.WORLD`` as
    a default argument when they are imported.

    ``torch.distributed.nn.functional`` declares ``def all_reduce(..., group=group.WORLD)``; imported
    after ``init_process_group`` (creating the first optimizer imports it, through torch._dynamo
    and FSDP), that default holds the default group for good, so ``destroy_process_group`` cannot
    free it. It is then freed during interpreter shutdown, while gloo's worker threads still run,
    and now and then a rank aborts at exit ("terminate called without an active exception").
    Imported first, the default is the empty placeholder and nothing outlives the shutdown.
    """
    importlib.import_module("torch.distributed.nn")


def shutdown_distributed(wait: bool = True) -> None:
    """Destroy the process group, after waiting for every rank when ``wait`` (leaving it to
    interpreter exit can abort the process while the backend's threads still run). After an error
    on this rank, pass ``wait=False``: the other ranks may never arrive. When the wait fails (a rank
    has gone), the group is left for the error path, which names the rank and then destroys it."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    if wait:
        torch_dist.barrier()
    try:
        torch_dist.destroy_process_group()
    except Exception:  # after an error, best effort: the error already says what happened
        if wait:
            raise


def shard(n: int, world_size: int, rank: int) -> Tuple[int, int]:
    """The range [start, stop) of ``rank``'s contiguous part of n items.

    k = n // W each, the first n % W ranks one more, as the reference partitions. Used for tables
    (model parallel) and batch rows (data parallel)."""
    k, m = divmod(n, world_size)
    return rank * k + min(rank, m), (rank + 1) * k + min(rank + 1, m)


def average_gradients(params: Sequence[torch.nn.Parameter], info: DistInfo) -> None:
    """All-reduce the dense gradients and divide by W (what DistributedDataParallel does)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or info.world_size == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> List[float]:
    """Sum a few numbers over all ranks (float64)."""
    if info.world_size == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else None
    t = torch.tensor(list(values), dtype=torch.float64, device=device)  # nccl reduces CUDA tensors only
    torch_dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj, info: DistInfo, main_only: bool = False) -> list:
    """Every rank's ``obj``, in rank order, on every rank; with ``main_only``, on rank 0 only (the
    others get an empty list), which spares sending whole tables to ranks that do not need them."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    if not main_only:
        torch_dist.all_gather_object(out, obj)
        return out
    torch_dist.gather_object(obj, out if info.is_main else None, dst=0)
    return out if info.is_main else []


def check_ranks_agree(settings: Dict[str, Tuple[object, str]], info: DistInfo) -> None:
    """Raise ConfigError, on every rank, naming the first setting on which some rank differs from rank 0.

    ``settings`` maps a name (``--learning-rate``) to (what must be equal, what to show): every rank
    sends its own, so ranks started with different command lines stop before they train a model
    that no single process would train, or meet in mismatched collectives.
    """
    if info.world_size == 1:
        return
    reason = first_disagreement(gather_objects(settings, info))
    if reason is not None:
        raise ConfigError(reason)


def first_disagreement(settings_by_rank: Sequence[Dict[str, Tuple[object, str]]]) -> Optional[str]:
    """The one-line reason naming the first setting (in rank 0's order) on which a rank differs from
    rank 0, and both values; None when all agree."""
    ours = settings_by_rank[0]
    for rank, theirs in enumerate(settings_by_rank[1:], start=1):
        unknown = [name for name in theirs if name not in ours] + [name for name in ours if name not in theirs]
        if unknown:
            return (f"ranks disagree on the settings they know (different versions of the program?): only one of "
                    f"rank 0 and rank {rank} has {unknown[0]}")
    for name, (key, shown) in ours.items():
        for rank, theirs in enumerate(settings_by_rank[1:], start=1):
            if theirs[name][0] != key:
                return f"ranks disagree on {name}: rank 0 has {shown}, rank {rank} has {theirs[name][1]}"
    return None


def all_or_none(step: Callable[[], object], info: DistInfo, what: str) -> object:
    """Run ``step()`` on every rank, succeeding on all of them or on none.

    A rank whose step raises a DLRMError raises it; every other rank then raises a DistributedError
    naming the first failing rank and its reason (``what`` completes "could not ..."), so no rank
    goes on alone into a collective that the failed one will never join.
    """
    try:
        result, failure = step(), None
    except DLRMError as exc:
        result, failure = None, exc
    if info.world_size > 1:
        reasons = gather_objects(None if failure is None else str(failure), info)
        failed = [(rank, reason) for rank, reason in enumerate(reasons) if reason is not None]
        if failure is None and failed:
            rank, reason = failed[0]
            raise DistributedError(f"rank {info.rank}: stopping because rank {rank} could not {what}: {reason}")
    if failure is not None:
        raise failure
    return result
