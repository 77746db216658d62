"""anomalens.backbones."""
