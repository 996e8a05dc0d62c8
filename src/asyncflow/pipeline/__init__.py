"""Stage loops over the streaming queue, the staleness gate, step accounting and the runner."""
