"""pdorch.sim."""
