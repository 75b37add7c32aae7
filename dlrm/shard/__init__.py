"""Embedding tables split over ranks: the plan, the tables that follow it, and the all-to-all."""
