"""Sharding of the embedding tables over ranks: the plan (:mod:`dlrm.shard.plan`)."""
