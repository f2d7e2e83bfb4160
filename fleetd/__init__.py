"""fleetd: keeps a declared fleet of vLLM and Ollama workers running on one host's NVIDIA GPUs.

The package is layered (see docs/architecture.md): ``model`` and ``planning`` are pure,
``runtime`` and ``sim`` hold the side effects, ``cli`` is the shell the user touches.
"""

__version__ = "0.1.0"
