"""Command lines the run tests start from."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The checkout: where ``dlrm_s_pytorch.py`` and the other front doors are."""

SMALL = ["--mini-batch-size=2", "--data-size=6"]
"""The reference's default model on three batches of two: a whole run in well under a second."""
