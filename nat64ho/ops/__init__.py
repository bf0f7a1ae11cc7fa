"""What operators ask of a database, one module per job: queries (query,
who, stats), export, importer (import, rebuild), maintenance (prune); db
holds what they share (transactions, streaming, the in-use check); pgconn
lets the same code run on PostgreSQL."""
