"""What feeds training from the shards: the samplers, the augmentation and the torch and DALI loaders
behind one batch contract (`loader`). The format itself lives in `distseg.shards`, one room down."""
