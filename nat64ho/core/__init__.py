"""The pure core: the codec, the session rules, the NAT64 tables and the
records they exchange. Nothing here does I/O or reads a clock: time comes in
as arguments, so every rule can be tested without sockets or a database."""
