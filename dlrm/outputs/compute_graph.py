"""The autograd graph of a model as a picture (``--plot-compute-graph``).

:func:`write_compute_graph` draws the graph that produced one tensor with ``torchviz.make_dot``: the
loss for the training graph (forward and the backward it implies), or the prediction for the inference
graph. It always writes the Graphviz source ``<stem>.gv``; when Graphviz's ``dot`` program is on PATH
it also renders ``<stem>.pdf``, and otherwise it says how to install Graphviz and render the source
later (``dot -Tpdf <stem>.gv -o <stem>.pdf``).

Drawing is a by-product of a run, never a reason to stop one: every failure (torchviz not installed,
a directory that cannot be written, ``dot`` failing) becomes one ``warning:`` line through ``log``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Callable, List, Mapping

import torch

from dlrm.io.atomic import atomic_path

RENDER_TIMEOUT_S = 300  # dot on a DLRM graph takes about a second; a hung dot must not hang the run


def write_compute_graph(output: torch.Tensor, params: Mapping[str, torch.Tensor], path_stem: str,
                        log: Callable[[str], None]) -> List[str]:
    """Draw the autograd graph behind ``output``; returns the paths written, in order (``.gv``, then
    ``.pdf`` where rendered), or ``[]``.

    Args:
        output (Tensor): the loss (training graph) or the prediction (inference graph). It must have
            been computed with autograd on: under ``torch.no_grad()`` there is no graph, only the tensor.
        params (Mapping[str, Tensor]): ``dict(model.named_parameters())``; names label the leaves.
        path_stem (str): where to write, without extension (``dlrm_s_pytorch`` →
            ``dlrm_s_pytorch.gv``, ``dlrm_s_pytorch.pdf``). Its directory must exist.
        log (Callable[[str], None]): the run's printer; gets one line (what was written, or why not).

    Never raises: a failure is logged as ``warning: ...`` and the paths written so far are returned.
    """
    written: List[str] = []
    gv, pdf = f"{path_stem}.gv", f"{path_stem}.pdf"
    try:
        try:
            from torchviz import make_dot
        except ImportError:
            log("warning: the compute graph needs torchviz (pip install torchviz); no graph written")
            return written
        if output.grad_fn is None:
            log(f"warning: compute graph {path_stem}: the tensor has no autograd history (computed under "
                "torch.no_grad() or inference_mode?); nothing written")
            return written
        source = make_dot(output, params=dict(params)).source
        with atomic_path(gv) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(source)
        written.append(gv)
        dot = shutil.which("dot")
        if dot is None:
            log(f"compute graph written to {gv}; to draw it, install Graphviz (apt-get install graphviz, "
                f"or brew install graphviz) and run: dot -Tpdf {gv} -o {pdf}")
            return written
        _render_pdf(dot, gv, pdf)
        written.append(pdf)
        log(f"compute graph written to {gv} and {pdf}")
    except Exception as exc:  # a picture must never end a training run
        log(f"warning: compute graph {path_stem}: {_describe(exc)}; "
            + (f"only {written[0]} written" if written else "nothing written"))
    return written


def _render_pdf(dot: str, gv: str, pdf: str) -> None:
    """Render ``gv`` into ``pdf`` with ``dot -Tpdf`` (atomically); raises RuntimeError with dot's last error line."""
    with atomic_path(pdf, suffix=".pdf") as tmp:
        done = subprocess.run([dot, "-Tpdf", gv, "-o", tmp], capture_output=True, text=True,
                              timeout=RENDER_TIMEOUT_S)
        if done.returncode != 0 or not os.path.exists(tmp):
            lines = done.stderr.strip().splitlines()
            raise RuntimeError(f"dot -Tpdf failed (exit {done.returncode})" + (f": {lines[-1]}" if lines else ""))


def _describe(exc: Exception) -> str:
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"dot did not finish within {RENDER_TIMEOUT_S} s"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot write it ({exc.strerror})"
    return str(exc) or type(exc).__name__
