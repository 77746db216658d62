"""anomalens.benchmark."""
