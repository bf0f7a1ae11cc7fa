"""Where the tables and the history are kept: the storage interface
(:mod:`.base`), the SQLite backend, its schema and its ownership lock, and
the PostgreSQL backend (:mod:`.postgres`, :mod:`.pg_schema`, :mod:`.pg_owner`)."""
