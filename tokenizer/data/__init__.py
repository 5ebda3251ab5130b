"""Data: webdataset shards in (reading, the resumable stream, image decoding), shards out
(the writer, index shards of tokenized corpora), and the demo set.

Import from the module that holds a name (`tokenizer.data.stream`, `tokenizer.data.index.reader`
...): this package imports nothing, so loading a Tokenizer does not pull in the demo builder
or the stream's DataLoader machinery."""
