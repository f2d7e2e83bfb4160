"""Pure planning: placement of model replicas on GPUs (no I/O, deterministic)."""
