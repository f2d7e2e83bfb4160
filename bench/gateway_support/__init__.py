"""Helpers of bench/gateway.py: processes, the fleet under test, the proxies, the load."""
