"""Optimizers and the learning-rate schedule (spec §1.7, §6.1)."""
from .lr_schedule import LRPolicyScheduler, lr_at
from .rwsadagrad import RWSAdagrad

__all__ = ["LRPolicyScheduler", "RWSAdagrad", "lr_at"]
