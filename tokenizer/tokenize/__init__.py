"""Tokenizing a corpus: image shards in, index shards out (tools/tokenize_dataset.py)."""
