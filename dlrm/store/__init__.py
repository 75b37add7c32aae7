"""Embedding tables kept in files behind a row cache in RAM (``--embedding-store=disk``)."""
