"""Compressed embedding tables: quotient-remainder and mixed dimensions."""
from .md_embedding_bag import PrEmbeddingBag, md_solver
from .qr_embedding_bag import QREmbeddingBag

__all__ = ["PrEmbeddingBag", "QREmbeddingBag", "md_solver"]
