"""Periodic checkpoints: a base and a chain of increments holding only the rows that changed."""
