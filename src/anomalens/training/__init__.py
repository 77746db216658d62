"""anomalens.training."""
