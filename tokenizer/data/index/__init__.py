"""Index shards (tokenized corpora for priors): the format and manifest, the writer and its
background sink, the reader (IndexShards: every grid, equal per-rank counts in balance.py,
mid-epoch resume in progress.py; PackedIndex), verification, appends, duplicates."""
