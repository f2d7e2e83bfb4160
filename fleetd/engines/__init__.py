"""Engine adapters: how to launch each engine and how to tell it is ready. Pure functions."""
