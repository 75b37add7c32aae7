"""Files: written atomically, npz streams, provenance records and output-path collisions."""
