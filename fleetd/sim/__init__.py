"""Simulated hardware and engines: the demo mode and the tests' world on GPU-less machines.

Everything here imitates documented behaviour of the real thing (see
shared/reference/engines-nvml-systemd.md); nothing here is imported by the real daemon path
except through the composition root.
"""
