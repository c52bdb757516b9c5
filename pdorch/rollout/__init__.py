"""pdorch.rollout."""
