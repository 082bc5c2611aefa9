"""The shard format and its sources: the Cityscapes files shards are made from (`cityscapes`, `image_files`,
`synth`), the writer (`shard`, `shard_outputs`), the manifest, the codec, storage and the node-local cache,
the sample index and random-access reading (`shard_reader`). What feeds training from shards lives in
`distseg.data`, one room up; this room imports only the leaves."""
