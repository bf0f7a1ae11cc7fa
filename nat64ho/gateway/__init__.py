"""The NAT64 side: a userspace stateful NAT64 on a TUN device whose port
table lives in handoff servers (``nat64ho gateway``), and the test bed that
puts it between an IPv6-only client and an IPv4 host.

``translate`` (packets, pure), ``core`` (flows and sessions, sans-I/O) and
``tun`` (the device and the event loop) build the gateway; ``testbed`` the
namespaces around it.
"""
