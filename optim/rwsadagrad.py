"""Row-wise sparse Adagrad, under the reference's module name (the code: :mod:`dlrm.optim.rwsadagrad`)."""
from dlrm.optim.rwsadagrad import RWSAdagrad  # noqa: F401
