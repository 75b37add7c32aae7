"""Compressed embedding tables: quotient-remainder (spec §5.1) and mixed dimensions (§5.2)."""
from .md_embedding_bag import PrEmbeddingBag, md_solver
from .qr_embedding_bag import QREmbeddingBag

__all__ = ["PrEmbeddingBag", "QREmbeddingBag", "md_solver"]
