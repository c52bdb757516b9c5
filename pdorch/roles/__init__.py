"""pdorch.roles."""
