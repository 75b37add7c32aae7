"""Runs ``dlrm_s_pytorch.main`` and then reports the backend threads still alive in this process.

Used by the multi-process tests under torchrun: after a clean shutdown no gloo thread may remain,
since a process group freed only at interpreter exit, with its threads running, now and then
aborts a rank at exit.
"""
import os
import sys

import dlrm_s_pytorch


def backend_threads() -> list:
    names = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            continue
    return sorted(name for name in names if "gloo" in name)


if __name__ == "__main__":
    code = dlrm_s_pytorch.main(sys.argv[1:])
    print(f"rank {os.environ.get('RANK')} backend threads after main: {backend_threads()}", file=sys.stderr)
    raise SystemExit(code)
