"""The batch contract (distseg/data/batch.py) as each loader keeps it, train and val, and the loader
protocol's resume rule: the torch loader keeps no position of its own, DALI's does."""

import importlib.util

import pytest
import torch

from distseg.config import load_config
from distseg.data.batch import Batch, Loader, PositionedLoader, batch_problems, masked_targets
from distseg.data.loader import make_loader
from distseg.labels import IGNORE, get_scheme

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None


def cfg_for(shards, loader):
    o = {"data.shards": shards, "data.loader": loader, "data.batch_size": 3, "data.val_batch_size": 2,
         "data.num_workers": 0, "data.crop": "[64,128]"}
    return load_config(None, [f"{k}={v}" for k, v in o.items()])


@pytest.mark.parametrize("kind", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not HAS_DALI, reason='DALI is not installed: pip install "distseg[dali]"'))])
@pytest.mark.parametrize("train", [True, False])
def test_each_loader_keeps_the_batch_contract(shards, kind, train):
    cfg = cfg_for(shards, kind)
    loader = make_loader(cfg, "train" if train else "val", get_scheme("trainid"), train, world=2, rank=1)
    assert isinstance(loader.keeps_position, bool) and loader.keeps_position == (kind == "dali")
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    for b in batches:
        assert batch_problems(b) == [], (kind, train, batch_problems(b))
    assert sum(int(b["valid"].sum()) for b in batches) > 0


def test_the_contract_check_names_what_is_wrong():
    good: Batch = {"image": torch.zeros(2, 3, 4, 6), "mask": torch.zeros(2, 4, 6, dtype=torch.int64),
                   "key": ["a", "b"], "valid": torch.ones(2, dtype=torch.bool),
                   "corrupt": torch.zeros(2, dtype=torch.bool)}
    assert batch_problems(good) == []
    assert batch_problems({k: v for k, v in good.items() if k != "corrupt"}) == ["missing ['corrupt']"]
    assert "mask" in batch_problems({**good, "mask": good["mask"].int()})[0]
    assert "does not match" in batch_problems({**good, "mask": torch.zeros(2, 4, 5, dtype=torch.int64)})[0]
    assert "valid" in batch_problems({**good, "valid": torch.ones(3, dtype=torch.bool)})[0]


def test_padding_counts_in_no_loss():
    b = {"mask": torch.tensor([[[1, 2]], [[3, 4]]]), "valid": torch.tensor([True, False])}
    assert masked_targets(b).tolist() == [[[1, 2]], [[IGNORE, IGNORE]]]


def test_the_loaders_meet_the_protocol():
    from distseg.data.dali_loader import DaliLoader
    from distseg.data.torch_loader import TorchLoader

    wanted = {n for n in vars(Loader) if not n.startswith("_")} - {"split"} | {"__len__", "__iter__"}
    own_position = {n for n in vars(PositionedLoader) if not n.startswith("_")}
    assert own_position == {"state_dict", "load_state_dict"} and not own_position & wanted
    assert all(hasattr(DaliLoader, n) for n in wanted | own_position)
    assert all(hasattr(TorchLoader, n) for n in wanted - own_position)
    assert not any(hasattr(TorchLoader, n) for n in own_position), "the torch loader's position is RunState's"
    assert TorchLoader.keeps_position is False and DaliLoader.keeps_position is True
