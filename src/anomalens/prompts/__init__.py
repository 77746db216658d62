"""anomalens.prompts."""
