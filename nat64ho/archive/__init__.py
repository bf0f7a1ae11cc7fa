"""The sealed tier of the history: immutable Parquet segments, their hash
chain, sealing the hot tier into them, and the reads that span both tiers."""
