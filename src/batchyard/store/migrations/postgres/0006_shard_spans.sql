-- A shard planned from spans of its input file (lines that share a prompt prefix, gathered across the whole file:
-- domain/planning.py): flat little-endian int64 triples (start, end, first line). NULL: the range start_off..end_off.
ALTER TABLE shards ADD COLUMN spans BYTEA;
