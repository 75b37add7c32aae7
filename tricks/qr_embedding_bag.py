"""Quotient-remainder tables, under the reference's module name (the code: :mod:`dlrm.model.qr_embedding_bag`)."""
from dlrm.model.qr_embedding_bag import QREmbeddingBag  # noqa: F401
