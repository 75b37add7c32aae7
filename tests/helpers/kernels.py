"""The project's C++ kernels, for the tests that need them built."""
import pytest


def require_built(load_extension, what: str) -> float:
    """Build (or load from the cache) a kernel; fail the calling test, naming why, if it does not build.

    ``load_extension`` is the module's ``_load_extension``: it returns (module or None, why not, seconds).
    Returns the seconds the build or load took.
    """
    module, reason, seconds = load_extension()
    if module is None:
        pytest.fail(f"{what} did not build ({reason}); the tests that need it cannot run")
    return seconds
