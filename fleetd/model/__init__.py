"""Pure data shared by every layer: GPU observations, units, identifiers. No I/O, no asyncio."""
