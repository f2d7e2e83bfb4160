"""Command-line entry points: ``fleetd`` (the daemon's own commands)."""
