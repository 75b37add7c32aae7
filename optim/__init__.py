"""Optimizers and the learning-rate schedule."""
from .lr_schedule import LRPolicyScheduler, lr_at
from .rwsadagrad import RWSAdagrad

__all__ = ["LRPolicyScheduler", "RWSAdagrad", "lr_at"]
