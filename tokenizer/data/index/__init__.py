"""Index shards (tokenized corpora for priors): the format and manifest, the writer and its
background sink, the reader (IndexShards, PackedIndex), verification, appends, duplicates."""
