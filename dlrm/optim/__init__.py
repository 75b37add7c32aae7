"""Optimizers and the learning-rate schedule."""
from dlrm.optim.lr_schedule import LRPolicyScheduler, lr_at
from dlrm.optim.rwsadagrad import RWSAdagrad

__all__ = ["LRPolicyScheduler", "RWSAdagrad", "lr_at"]
