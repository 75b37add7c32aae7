"""torch.distributed set-up and the all-to-all, under the reference's module name (the code:
:mod:`dlrm.distributed`)."""
from dlrm.distributed import (DistInfo, DistributedError, all_or_none,  # noqa: F401
                                  all_reduce_sum, announce_failure, average_gradients, check_ranks_agree,
                                  current_info, first_disagreement, gather_objects, init_distributed,
                                  is_collective_failure, peer_failure, shard, shutdown_distributed,
                                  world_size_from_env)
from dlrm.shard.exchange import PooledExchange  # noqa: F401
