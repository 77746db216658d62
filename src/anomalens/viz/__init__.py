"""anomalens.viz."""
