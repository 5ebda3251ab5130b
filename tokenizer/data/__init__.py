"""Data: webdataset shard writing, the resumable image stream, and the demo set."""

from tokenizer.data.demo import DemoSet, build_demo_set, load_sample_photos
from tokenizer.data.folder import folder_samples, sanitize_key
from tokenizer.data.images import (
    IMAGE_EXTENSIONS,
    ImageBatch,
    StreamPosition,
    StreamTracker,
    check_shards_exist,
    eval_transform,
    expand_shards,
    iter_eval_batches,
    iter_train_batches,
    make_train_loader,
    shard_order,
    train_transform,
)
from tokenizer.data.shard_writer import ShardInfo, brace_pattern, shard_name, write_shards

__all__ = [
    "IMAGE_EXTENSIONS",
    "DemoSet",
    "ImageBatch",
    "ShardInfo",
    "StreamPosition",
    "StreamTracker",
    "brace_pattern",
    "build_demo_set",
    "check_shards_exist",
    "eval_transform",
    "expand_shards",
    "folder_samples",
    "iter_eval_batches",
    "iter_train_batches",
    "load_sample_photos",
    "make_train_loader",
    "sanitize_key",
    "shard_name",
    "shard_order",
    "train_transform",
    "write_shards",
]
