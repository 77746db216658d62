"""anomalens.cli."""
