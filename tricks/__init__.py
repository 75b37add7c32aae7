"""Compressed embedding tables: quotient-remainder and mixed dimensions (in :mod:`dlrm.model`),
under the reference's names."""
from dlrm.model.md_embedding_bag import PrEmbeddingBag, md_solver
from dlrm.model.qr_embedding_bag import QREmbeddingBag

__all__ = ["PrEmbeddingBag", "QREmbeddingBag", "md_solver"]
