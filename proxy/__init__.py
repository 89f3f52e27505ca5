"""jit-proxy: a Just-In-Time privileged access proxy (the daemon's import package)."""

__version__ = "0.1.0"
