"""nat64ho: the server side of the NAT64 handoff protocol (docs/protocol.md, v1.2)."""

__version__ = "0.1.0"
