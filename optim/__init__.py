"""Optimizers and the learning-rate schedule (in :mod:`dlrm.optim`), under the reference's names."""
from dlrm.optim.lr_schedule import LRPolicyScheduler, lr_at
from dlrm.optim.rwsadagrad import RWSAdagrad

__all__ = ["LRPolicyScheduler", "RWSAdagrad", "lr_at"]
