"""Sans-I/O protocol code: bytes in, typed events and bytes out; no sockets, no asyncio."""
