"""pdorch.scaler."""
