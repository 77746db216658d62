"""anomalens.scoring."""
