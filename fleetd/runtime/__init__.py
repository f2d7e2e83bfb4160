"""Effect boundaries: the GPU backend, and later the process launcher, health probe and clock.

Each boundary is a Protocol with a real implementation here and a simulated one in
``fleetd.sim``; only the composition root (the CLI / daemon) picks which.
"""
