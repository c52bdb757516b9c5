"""pdorch.proxy."""
