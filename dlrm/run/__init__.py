"""A benchmark run: flags, configuration, the run itself, training loops, and checkpoints."""
