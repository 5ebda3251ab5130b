"""Data: webdataset shard reading and writing, the resumable image stream, the demo set,
and index shards (tokenized corpora for priors)."""

from tokenizer.data.demo import DemoSet, build_demo_set, load_sample_photos
from tokenizer.data.folder import folder_samples, sanitize_key
from tokenizer.data.images import (
    ImageBatch,
    StreamPosition,
    StreamTracker,
    check_shards_exist,
    expand_shards,
    iter_eval_batches,
    iter_train_batches,
    make_train_loader,
)
from tokenizer.data.index_format import IndexManifest, code_dtype, read_manifest
from tokenizer.data.index_shards import (
    IndexSample,
    IndexShards,
    PackedIndex,
    TokenBatch,
    collate_tokens,
)
from tokenizer.data.order import shard_order
from tokenizer.data.shard_writer import (
    ShardInfo,
    TarShardWriter,
    brace_pattern,
    shard_name,
    write_shards,
)
from tokenizer.data.tars import IMAGE_EXTENSIONS, DecodeError, RawSample, decode_image, read_tar
from tokenizer.data.transforms import eval_crop, eval_transform, train_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeError",
    "DemoSet",
    "ImageBatch",
    "IndexManifest",
    "IndexSample",
    "IndexShards",
    "PackedIndex",
    "RawSample",
    "ShardInfo",
    "StreamPosition",
    "StreamTracker",
    "TarShardWriter",
    "TokenBatch",
    "brace_pattern",
    "build_demo_set",
    "check_shards_exist",
    "code_dtype",
    "collate_tokens",
    "decode_image",
    "eval_crop",
    "eval_transform",
    "expand_shards",
    "folder_samples",
    "iter_eval_batches",
    "iter_train_batches",
    "load_sample_photos",
    "make_train_loader",
    "read_manifest",
    "read_tar",
    "sanitize_key",
    "shard_name",
    "shard_order",
    "train_transform",
    "write_shards",
]
