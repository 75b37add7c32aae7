"""The C++ kernels in ``csrc/``, built once per machine (:mod:`dlrm.kernels.native_build`), and fast random draws."""
