"""Model configurations the tests build on."""
from dlrm.model.dlrm import ModelConfig


def tiny_model_config(**overrides):
    """The reference's default model: tables 4-3-2, dim 2, bottom 4-3-2, top (8)-4-2-1."""
    base = dict(embedding_dim=2, table_sizes=(4, 3, 2), bottom_mlp=(4, 3, 2), top_mlp=(8, 4, 2, 1))
    base.update(overrides)
    return ModelConfig(**base)
