"""The ZeroMQ server: the socket loop (``router``), its ops (``ops``) and server-side jobs (``jobs``)."""

from qpbridge.server.router import CAPABILITIES, MAX_PAGE, SLIDE_CAPABILITY, Server, is_loopback_address

__all__ = ["CAPABILITIES", "MAX_PAGE", "SLIDE_CAPABILITY", "Server", "is_loopback_address"]
