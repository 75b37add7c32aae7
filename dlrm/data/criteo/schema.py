"""The Criteo data's columns: one label, 13 dense counts and 26 categorical hashes.

A raw line holds the NUM_FIELDS fields tab-separated in this order ``label, I1..I13, C1..C26``;
a packed row (the row cache, the MLPerf binary records) holds them as int32 in the same order.
The one definition every Criteo module (preprocessing, loaders, the fake-data generator) uses.
"""
from __future__ import annotations

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
FIELD_NAMES = ("label",) + tuple(f"I{k}" for k in range(1, NUM_DENSE + 1)) + tuple(
    f"C{k}" for k in range(1, NUM_SPARSE + 1))
RECORD_BYTES = 4 * NUM_FIELDS  # one packed row of int32

KAGGLE_HINT = ("download train.txt of the Criteo Display Advertising Challenge dataset "
               "(https://ailab.criteo.com/ressources/) and put it there")
TERABYTE_HINT = ("download day_0 .. day_23 of the Criteo 1TB Click Logs "
                 "(https://labs.criteo.com/2013/12/download-terabyte-click-logs/), unzip them and "
                 "pass their common prefix (e.g. ./input/day) as --raw-data-file")
