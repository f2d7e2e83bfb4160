"""The gateway: one OpenAI-compatible (and Ollama-native) endpoint in front of the fleet.

fleetd knows which workers are ready, which are draining and how many requests each one runs,
so the gateway lives inside it rather than in an external proxy. ``routing`` is the pure
decision (no I/O, unit-tested as a table); ``inflight`` counts requests per worker for drains;
``proxy`` moves bytes; ``server`` is the aiohttp application.
"""
