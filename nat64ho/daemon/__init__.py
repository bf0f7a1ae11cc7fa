"""The running server: the datagram protocol, start and stop, the log file,
metrics and IPFIX export. Sockets, timers and clocks live here, rules do not."""
