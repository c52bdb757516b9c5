"""pdorch.controller."""
