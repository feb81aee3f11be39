"""Data plumbing every task shares: the data module, exact-resume samplers, synthetic images."""
