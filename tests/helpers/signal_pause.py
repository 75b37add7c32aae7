"""Runs the command line as ``python dlrm_s_pytorch.py`` does, pausing at one moment of the run,
for the signal tests.

``DLRM_TEST_PAUSE`` names the moment: ``test`` (inside a test pass, after its first batch),
``save`` (the checkpoint written under its temporary name, before the rename) or ``preprocess``
(inside preprocessing, the first day's files half written). There the process prints ``PAUSED <moment>`` on
standard output and waits for the test's signal; with ``DLRM_TEST_PAUSE_COUNT=n``, at the moment's
n-th time.
"""
import os
import sys
import time

import torch

import dlrm_s_pytorch
from dlrm.data.criteo import days
from dlrm.run import train

MOMENT = os.environ["DLRM_TEST_PAUSE"]
COUNT = int(os.environ.get("DLRM_TEST_PAUSE_COUNT", "1"))  # pause at the moment's COUNT-th time
seen = [0]


def pause() -> None:
    seen[0] += 1
    if seen[0] < COUNT:
        return
    print(f"PAUSED {MOMENT}", flush=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the signal's exception is raised in here
        time.sleep(0.02)
    raise SystemExit("signal_pause: no signal came")


def install() -> None:
    if MOMENT == "test":
        real_batches = train._test_batches

        def paused_batches(parts, cfg):
            for i, batch in enumerate(real_batches(parts, cfg)):
                if i == 1:
                    pause()
                yield batch

        train._test_batches = paused_batches
    elif MOMENT == "save":
        real_save = torch.save

        def save_then_pause(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            pause()

        torch.save = save_then_pause
    elif MOMENT == "preprocess":
        real_day = days.run_day

        def paused_day(job, dictionaries, rng, on_rows):
            def pause_after_first_block(rows):  # the day's files are open, under temporary names
                on_rows(rows)
                pause()

            return real_day(job, dictionaries, rng, pause_after_first_block)

        days.run_day = paused_day


if __name__ == "__main__":
    install()
    dlrm_s_pytorch.exit_without_teardown(dlrm_s_pytorch.main(sys.argv[1:]))
