"""Command-line tools that read what a run wrote (logs) and draw or summarise it."""
