"""The asynchronous checkpoint writer: a snapshot holds the step it was taken at, whatever trains
after it; an async chain is the sync chain, file for file; a failed write reaches the training
thread; the stall and the write are reported."""
import pytest

from dlrm.checkpoints.chain import CheckpointChain, load_chain, owned
from dlrm.checkpoints.config import CheckpointConfig
from dlrm.checkpoints.increments import TouchedRows
from dlrm.checkpoints.periodic import PeriodicCheckpoints
from dlrm.checkpoints.writer import BackgroundWriter
from dlrm.common import FlagError, WriteError
from helpers.chain_models import CONFIG, SIZES, assert_same, payload_at, small_run, train_step


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rwsadagrad"])
def test_a_snapshot_holds_its_step_while_training_goes_on(tmp_path, optimizer):
    model, opt, schedule, batches = small_run(tmp_path, optimizer)
    names = [n for n, _ in model.named_parameters()]
    chain = CheckpointChain(str(tmp_path / "c"), CONFIG, rebase_fraction=10.0)
    touched = TouchedRows(SIZES)
    expected = None
    for step, batch in enumerate(batches[:3], start=1):
        train_step(model, opt, schedule, batch)
        touched.add(batch.indices)
        pending = chain.snapshot(payload_at(model, opt, optimizer, schedule, step), touched.take(), names)
        expected = owned(payload_at(model, opt, optimizer, schedule, step))
        train_step(model, opt, schedule, batches[step + 3])  # in place, before the write: the snapshot holds
        touched.add(batches[step + 3].indices)  # the next increment has these rows
        chain.write(pending)
    assert [link.kind for link in chain.links] == ["base", "increment", "increment"]
    assert_same(load_chain(chain.directory), expected)


def _train_with(tmp_path, writer, every=2):
    model, opt, schedule, batches = small_run(tmp_path, "adagrad")
    lines = []
    cfg = CheckpointConfig(checkpoint_every=every, checkpoint_dir=str(tmp_path / writer), checkpoint_writer=writer)
    checkpoints = PeriodicCheckpoints(cfg, model, opt, CONFIG, SIZES, note=lines.append)
    for step, batch in enumerate(batches, start=1):
        train_step(model, opt, schedule, batch)
        if checkpoints.after_step(batch.indices):
            checkpoints.save(lambda: payload_at(model, opt, "adagrad", schedule, step), f"step {step}")
    checkpoints.close()
    return checkpoints, lines


def test_an_async_chain_is_the_sync_chain(tmp_path):
    sync, sync_lines = _train_with(tmp_path, "sync")
    both, async_lines = _train_with(tmp_path, "async")
    assert [(link.kind, link.iter, link.bytes) for link in both.chain.links] == \
        [(link.kind, link.iter, link.bytes) for link in sync.chain.links]
    assert_same(load_chain(str(tmp_path / "async")), load_chain(str(tmp_path / "sync")))
    assert len(both.stalls) == 4 and all(s >= 0 for s in both.stalls)
    copied = [line for line in async_lines if "copied for the writer in" in line]
    written = [line for line in async_lines if "written in" in line and "beside training" in line]
    assert len(copied) == len(written) == 4, async_lines
    increments = len(both.chain.links) - 1
    assert async_lines[-1].startswith(f"checkpoints: 4 taken, the chain now a base and {increments} increment")
    assert not any("copied" in line for line in sync_lines) and len(sync_lines) == 5


def test_a_failed_write_reaches_the_training_thread_at_its_next_checkpoint():
    writer = BackgroundWriter()

    def fail():
        raise WriteError("cannot write the checkpoint x.pt: No space left on device")

    writer.submit(fail)
    with pytest.raises(RuntimeError, match="a write is in flight"):
        writer.submit(lambda: None)
    with pytest.raises(WriteError, match="No space left on device"):
        writer.finish()
    writer.submit(lambda: 7)
    assert writer.finish()[0] == 7 and writer.finish() == (None, 0.0)


@pytest.mark.parametrize("fields,message", [
    ({"checkpoint_quantize": 3}, "{checkpoint_quantize} takes 8, 4 or 2 (bits a value), got 3"),
    ({"checkpoint_writer": "later"}, "{checkpoint_writer} takes async or sync, got 'later'"),
])
def test_bad_writer_settings_are_refused(fields, message):
    with pytest.raises(FlagError) as caught:
        CheckpointConfig(checkpoint_every=1, checkpoint_dir="d", **fields)
    assert str(caught.value) == message.replace("{", "").replace("}", "")
