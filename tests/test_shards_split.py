"""Opening a split: shards of the asked scheme read as stored, labelid shards through the scheme's table (the
same masks as shards made in that scheme), shards of another scheme refused in one line."""

import numpy as np
import pytest
import torch

from distseg.config import load_config
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.shards.shard import ShardOptions, run_shard
from distseg.shards.shard_reader import decode_mask
from distseg.shards.split import open_split


def masks(opened, data) -> list[torch.Tensor]:
    samples = opened.samples(data, log=lambda *a: None)
    return [decode_mask(samples.read(i, "mask"), opened.lut) for i in range(len(samples))]


def test_labelid_shards_are_remapped_to_the_masks_of_the_schemes_own_shards(synth_root, shards, tmp_path):
    run_shard(synth_root, tmp_path, ShardOptions(split="val", scheme="labelid", maxcount=2), progress=False,
              log=lambda *a: None)
    trainid, data = get_scheme("trainid"), load_config(None, []).data
    own, labelid = open_split(shards, "val", trainid), open_split(tmp_path, "val", trainid)
    assert own.lut is None and own.split == "val" and own.manifest["total"] == labelid.manifest["total"]
    assert np.array_equal(labelid.lut, trainid.lut)
    assert all(torch.equal(a, b) for a, b in zip(masks(own, data), masks(labelid, data), strict=True))
    # the loss weights' histogram: labelid counts summed through the table equal the trainid shards' own
    assert own.class_pixels().sum() > 0 and np.array_equal(own.class_pixels(), labelid.class_pixels())


def test_shards_of_another_scheme_are_refused_in_one_line(shards, person_shards):
    for folder, scheme, made in ((shards, "category", "trainid"), (person_shards, "trainid", "person")):
        refusal = f"sharded with scheme '{made}'.*re-shard with --scheme {scheme}"
        with pytest.raises(UserError, match=refusal) as e:
            open_split(folder, "train", get_scheme(scheme))
        assert "\n" not in str(e.value)
