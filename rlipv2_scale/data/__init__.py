"""Relational data: one record schema, readers of the real formats, MDS shards, streaming, batches."""
