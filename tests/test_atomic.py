"""The one atomic-write helper: the target appears complete or not at all."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlrm.io.atomic import atomic_open, atomic_path, remove_stale_temps, temp_name


def test_the_target_appears_only_when_the_write_completes(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_path(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)  # same directory, so the rename is atomic
        with open(tmp, "wb") as f:
            f.write(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(str(target)) as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


# above the largest pid Linux gives (2**22): no process has these
GONE, GONE_TOO = 4194305, 4194399


def test_stale_temporaries_of_one_target_are_removed(tmp_path):
    target = tmp_path / "day_0.npz"
    left = [tmp_path / f"day_0.npz.{GONE}-abcdef12.tmp", tmp_path / f"day_0.npz.{GONE_TOO}-00aa11bb.tmp.npy"]
    keep = [tmp_path / "day_0.npz", tmp_path / f"day_1.npz.{GONE}-abcdef12.tmp", tmp_path / "day_0.npz.notes"]
    for p in left + keep:
        p.write_bytes(b"x")
    assert sorted(remove_stale_temps(str(target))) == sorted(map(str, left))
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in keep)


def test_temporaries_of_running_writers_are_kept(tmp_path):
    """A file that a live process is writing is never removed, whoever's it is."""
    target = tmp_path / "day_0.npz"
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = [tmp_path / f"day_0.npz.{writer.pid}-abcdef12.tmp", Path(temp_name(str(target)))]
        stale = tmp_path / f"day_0.npz.{GONE}-abcdef12.tmp"
        for p in live + [stale]:
            p.write_bytes(b"x")
        assert remove_stale_temps(str(target)) == [str(stale)]
        assert all(p.exists() for p in live)
    finally:
        writer.kill()
        writer.wait()
    assert remove_stale_temps(str(target)) == [str(live[0])]  # its writer is gone now
