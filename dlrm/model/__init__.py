"""The DLRM network (:mod:`dlrm.model.dlrm`), its compressed and fused tables and its fast numerics."""
