"""Input data: random and trace-based synthetic batches, and the Criteo data sets (:mod:`dlrm.data.criteo`)."""
