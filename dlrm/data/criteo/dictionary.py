"""Per-column dictionaries: raw categorical value -> id, in order of first appearance.

Ids come from sorted arrays (binary search), about 40 bytes per distinct value with the merge
temporaries; the dictionaries are saved as ``<d_file>_fea_dict_<j>.npz`` (the raw values in id
order) and ``<d_file>_fea_count.npz`` (their sizes).
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import pyarrow as pa

from dlrm.common import DataError
from dlrm.data.criteo.config import CriteoPaths
from dlrm.data.criteo.schema import NUM_SPARSE
from dlrm.io import provenance
from dlrm.io.npz import load_npz_array, save_npz


class ColumnDictionary:
    """Raw categorical values of one column -> ids 0..c-1 in order of first appearance.

    Stored as sorted (key, id) arrays, a large main part and a small recent part that is merged
    into the main one when it grows past an eighth of it, so a lookup is two binary searches and
    inserting amortises to O(log) moves per value.
    """

    def __init__(self, values_in_id_order: Optional[np.ndarray] = None, source: str = ""):
        values = np.asarray(values_in_id_order if values_in_id_order is not None else [],
                            dtype=np.int64)
        order = np.argsort(values, kind="stable")
        self._keys, self._ids = values[order], order.astype(np.int64)
        if len(values) and np.any(self._keys[1:] == self._keys[:-1]):
            raise DataError(f"{source or 'dictionary'}: holds a value twice")
        self._recent_keys = np.zeros(0, dtype=np.int64)
        self._recent_ids = np.zeros(0, dtype=np.int64)
        self.size = len(values)

    def __len__(self) -> int:
        return self.size

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Ids (int64) of ``values`` (any order, repeats allowed); unseen values get new ids in
        order of first appearance."""
        values = np.asarray(values, dtype=np.int64)
        order = np.argsort(values)
        sorted_values = values[order]
        if len(values) > 1 and np.any(sorted_values[1:] == sorted_values[:-1]):
            encoded = pa.array(values).dictionary_encode()
            return self.encode_distinct(encoded.dictionary.to_numpy())[encoded.indices.to_numpy()]
        return self._encode_sorted(order, sorted_values)

    def encode_distinct(self, distinct: np.ndarray) -> np.ndarray:
        """Ids of distinct values given in first-seen order."""
        distinct = np.asarray(distinct, dtype=np.int64)
        order = np.argsort(distinct)
        return self._encode_sorted(order, distinct[order])

    def _encode_sorted(self, order: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
        found = self._lookup(sorted_values)
        ids = np.empty(len(order), dtype=np.int64)
        ids[order] = found
        missing = found < 0
        if missing.any():
            new_positions = np.sort(order[missing])  # first-seen order of the new values
            ids[new_positions] = self.size + np.arange(len(new_positions))
            self._insert(sorted_values[missing], ids[order[missing]])
            self.size += len(new_positions)
        return ids

    def values_in_id_order(self) -> np.ndarray:
        """(c,) int64: the raw value of each id (the reference's ``unique``)."""
        out = np.empty(self.size, dtype=np.int64)
        out[self._ids] = self._keys
        out[self._recent_ids] = self._recent_keys
        return out

    @staticmethod
    def _find(keys: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> np.ndarray:
        if len(keys) == 0:
            return np.full(len(queries), -1, dtype=np.int64)
        position = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
        return np.where(keys[position] == queries, ids[position], -1)

    def _lookup(self, sorted_queries: np.ndarray) -> np.ndarray:
        found = self._find(self._keys, self._ids, sorted_queries)
        if len(self._recent_keys):
            missing = found < 0
            found[missing] = self._find(self._recent_keys, self._recent_ids,
                                        sorted_queries[missing])
        return found

    @staticmethod
    def _merge(keys, ids, new_keys, new_ids):
        """Merge two sorted (key, id) arrays."""
        at = np.searchsorted(keys, new_keys) + np.arange(len(new_keys))
        merged_keys = np.empty(len(keys) + len(new_keys), dtype=np.int64)
        merged_ids = np.empty_like(merged_keys)
        old = np.ones(len(merged_keys), dtype=bool)
        old[at] = False
        merged_keys[at], merged_ids[at] = new_keys, new_ids
        merged_keys[old], merged_ids[old] = keys, ids
        return merged_keys, merged_ids

    def _insert(self, sorted_keys: np.ndarray, ids: np.ndarray) -> None:
        self._recent_keys, self._recent_ids = self._merge(self._recent_keys, self._recent_ids,
                                                          sorted_keys, ids)
        if len(self._recent_keys) > max(1 << 16, len(self._keys) // 8):
            self._keys, self._ids = self._merge(self._keys, self._ids, self._recent_keys,
                                                self._recent_ids)
            self._recent_keys = self._recent_ids = np.zeros(0, dtype=np.int64)


def save_dictionaries(paths: CriteoPaths, dictionaries: List[ColumnDictionary],
                      raw_dtype: np.dtype, record: dict) -> np.ndarray:
    """Write ``_fea_dict_<j>.npz`` (unique) and then ``_fea_count.npz`` (counts); return counts."""
    for j, dictionary in enumerate(dictionaries):
        with provenance.recording(paths.fea_dict_file(j), record):
            save_npz(paths.fea_dict_file(j),
                     unique=dictionary.values_in_id_order().astype(raw_dtype))
    counts = np.array([len(d) for d in dictionaries], dtype=np.int32)
    with provenance.recording(paths.fea_count_file(), record):
        save_npz(paths.fea_count_file(), counts=counts)
    return counts


def load_dictionaries(paths: CriteoPaths) -> List[ColumnDictionary]:
    """The 26 saved dictionaries, from their ``_fea_dict_<j>.npz`` files."""
    dictionaries = []
    for j in range(NUM_SPARSE):
        unique = load_npz_array(paths.fea_dict_file(j), "unique")
        dictionaries.append(ColumnDictionary(unique, paths.fea_dict_file(j)))
    return dictionaries


def dictionary_files(paths: CriteoPaths) -> List[str]:
    """The files of stage 4: one per column, then the counts."""
    return [paths.fea_dict_file(j) for j in range(NUM_SPARSE)] + [paths.fea_count_file()]


def check_no_growth(paths: CriteoPaths, dictionaries: List[ColumnDictionary],
                    sizes: List[int]) -> None:
    """DataError when the data held values that saved dictionaries lacked (they grew past ``sizes``)."""
    for j, (dictionary, size) in enumerate(zip(dictionaries, sizes)):
        if len(dictionary) != size:
            raise DataError(f"{paths.fea_dict_file(j)}: the data holds values this dictionary "
                            "lacks; delete the _fea_dict_* and _fea_count.npz files to rebuild them")
