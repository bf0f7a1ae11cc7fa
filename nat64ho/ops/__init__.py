"""What operators ask of a database, one module per job: queries (query,
who, stats), export, importer (import, rebuild), maintenance (prune); db
holds what they share (one path to each backend, what the backends spell
differently, transactions, streaming, the in-use check); pgconn is the
path to PostgreSQL."""
