"""MLPerf events for ``--mlperf-logging``, under the reference's module name (the code:
:mod:`dlrm.outputs.mlperf_logger`)."""
from dlrm.outputs.mlperf_logger import (DEFAULT_LOG_FILE, MISSING_PACKAGE_WARNING, MLPerfLogger,  # noqa: F401
                                        make_mlperf_logger)
