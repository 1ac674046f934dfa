"""openpi-compatible pi0 that exposes its hidden states (openpi module names)."""
