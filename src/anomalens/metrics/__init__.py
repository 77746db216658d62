"""anomalens.metrics."""
