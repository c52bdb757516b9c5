"""pdorch.devcluster."""
