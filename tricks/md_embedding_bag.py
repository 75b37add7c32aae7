"""Mixed-dimension tables, under the reference's module name (the code: :mod:`dlrm.model.md_embedding_bag`)."""
from dlrm.model.md_embedding_bag import PrEmbeddingBag, md_solver  # noqa: F401
