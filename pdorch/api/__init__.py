"""pdorch.api."""
