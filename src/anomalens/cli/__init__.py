"""Command-line front end (thin: it calls only the public API)."""
