"""proxyd: a SOCKS5 / HTTP forwarding proxy daemon with one auto-detecting listener."""

__version__ = "0.1.0"
