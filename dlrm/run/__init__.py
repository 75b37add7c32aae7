"""A benchmark run: flags, configuration, the run itself, training loops, checkpoints and processes."""
