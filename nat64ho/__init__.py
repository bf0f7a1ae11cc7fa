"""nat64ho: the server side of the NAT64 handoff protocol (PROTOCOL.md v1.1)."""

__version__ = "0.1.0"
