"""The control API: HTTP + JSON over a Unix socket, served inside the daemon's event loop."""
