"""Observability: structured events (the spine), logging setup, later metrics and alerts."""
