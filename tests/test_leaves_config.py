"""The config layer's weighted training streams (data.streams, data.epoch_samples): read from a config file or
a YAML flow list override alike, every mistake one line naming the entry, saved so that it loads back (with
credentials removed from every stream's URL), shown by `distseg config`; and the epoch's shares."""

import difflib
import math
import random
import re
from fractions import Fraction

import pytest

from conftest import ROOT
from distseg.config import (
    Config,
    StreamCfg,
    default_epoch_samples,
    dump_config,
    load_config,
    settings_table,
    stream_shares,
)
from distseg.errors import UserError

FILE = """\
data:
  shards: shards/fine          # validation still reads data.shards / data.val_split
  streams:
    - {shards: shards/fine, split: train, weight: 3}
    - {shards: shards/coarse, split: train_extra, weight: 1}
"""
WANT = [StreamCfg("shards/fine", "train", 3.0), StreamCfg("shards/coarse", "train_extra", 1.0)]


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_streams_from_a_file_or_a_flow_list_override_are_the_same(tmp_path):
    assert Config().data.streams == [] and Config().data.epoch_samples == 0  # the simple case
    cfg = load_config(write(tmp_path, FILE))
    assert cfg.data.streams == WANT and cfg.data.shards == "shards/fine"
    assert all(isinstance(s.weight, float) for s in cfg.data.streams)
    flow = "data.streams=[{shards: shards/fine, split: train, weight: 3}, {shards: shards/coarse, split: " \
           "train_extra}]"
    assert load_config(None, [flow]).data.streams == WANT
    json = 'data.streams=[{"shards": "shards/fine", "weight": 3}, {"shards": "shards/coarse", "split": ' \
           '"train_extra"}]'
    assert load_config(None, [json]).data.streams == WANT
    # an override replaces the file's list whole; an empty one turns streams off
    assert load_config(write(tmp_path, FILE), ["data.streams=[{shards: x}]"]).data.streams == [StreamCfg("x")]
    assert load_config(write(tmp_path, FILE), ["data.streams=[]"]).data.streams == []
    assert load_config(write(tmp_path, FILE), ["data.epoch_samples=4000"]).data.epoch_samples == 4000


def test_a_weight_written_1e_3_is_a_number_as_elsewhere(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 without a dot as text; optim.lr: 1e-3 is taken as a number, and so is a
    stream's weight."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\ndata:\n  streams:\n"
                    "    - {shards: a, weight: 1e-3}\n    - {shards: b}\n")
    cfg = load_config(path)
    assert cfg.optim.lr == cfg.data.streams[0].weight == 0.001


ENTRY_MISTAKES = [
    ("- {shards: a}\n    - {shards: b, weight: -1}", "data.streams[1].weight must be > 0, got -1"),
    ("- {shards: a, weight: 0}", "data.streams[0].weight must be > 0, got 0"),
    ("- {shards: a, weight: .nan}", "data.streams[0].weight must be > 0, got nan"),
    ("- {shards: a, weight: .inf}", "data.streams[0].weight must be finite, got inf"),
    ("- {shards: a, weight: abc}", "data.streams[0].weight must be a number, got 'abc'"),
    ("- {shards: a, weight: 'three'}", "data.streams[0].weight must be a number, got 'three'"),
    ("- {shards: a, weight: true}", "data.streams[0].weight must be a number, got True"),
    ("- {shards: a}\n    - {shards: b, wieght: 2}",
     "unknown key data.streams[1].wieght (did you mean data.streams[1].weight?)"),
    ("- {shard: a}", "unknown key data.streams[0].shard (did you mean data.streams[0].shards?)"),
    ("- {split: train, weight: 2}", "data.streams[0].shards is missing"),
    ("- {shards: }", "data.streams[0].shards is empty"),
    ("- {shards: ''}", "data.streams[0].shards must name a shards folder or URL, got ''"),
    ("- {shards: a, split: no}", "data.streams[0].split must be a string, got False (YAML reads yes/no"),
    ("- {shards: a, split: 2019}",
     "data.streams[0].split must be a string, got 2019 (quote it: split: '2019')"),
    ("- {shards: a, split: [x]}", "data.streams[0].split must be a string, got ['x']"),
    ("- {shards: a, split: ''}", "data.streams[0].split must name a split, got ''"),
    ("- shards/fine", "data.streams[0] must be a mapping {shards, split, weight}, got 'shards/fine'"),
    ("- {shards: a}\n    - {shards: b}\n    - {shards: a/, weight: 2}",
     "data.streams[2] repeats data.streams[0] (shards a/, split train): one stream per shards and split"),
    # the same place once saved: a stream's password is not in the line either
    ("- {shards: 's3://k:one@b/x'}\n    - {shards: 's3://k:two@b/x'}",
     "data.streams[1] repeats data.streams[0] (shards s3://k:***@b/x, split train)"),
]


@pytest.mark.parametrize("entries,message", ENTRY_MISTAKES)
def test_a_stream_mistake_is_one_line_naming_the_entry(tmp_path, entries, message):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, f"data:\n  streams:\n    {entries}\n"))
    assert str(e.value).startswith(f"config: {message}") and "\n" not in str(e.value)
    assert "one@" not in str(e.value) and "two@" not in str(e.value)
    # the same entries as an override's flow list say the same
    flow = "[" + ", ".join(line.strip()[2:] for line in entries.split("\n")) + "]"
    with pytest.raises(UserError) as o:
        load_config(None, [f"data.streams={flow}"])
    assert str(o.value) == str(e.value)


@pytest.mark.parametrize("settings,message", [
    (["data.streams=a"], "data.streams must be a list of {shards, split, weight} mappings"),
    (["data.streams={shards: a}"], "data.streams is a list, set whole"),
    (["data.streams.weight=3"], "data.streams is a list, set whole"),
    (["data.streams=[{shards: a}"], "data.streams=[{shards: a} is not a valid YAML flow list: write "
                                    "data.streams=[{shards: a, weight: 3}, {shards: b, split: train_extra}]"),
    (["data.streams[0].weight=3"], "data.streams[0].weight: a list's entries are not set one by one"),
    (["data.epoch_samples=-1", "data.streams=[{shards: a}]"], "data.epoch_samples must be >= 0, got -1"),
    (["data.epoch_samples=10"], "data.epoch_samples is the epoch's length with data.streams"),
    (["data.epoch_samples=10", "data.streams=[{shards: a}]", "data.repeat=2"],
     "data.epoch_samples=10 sets the epoch's length itself: leave data.repeat=1"),
    (["data.epoch_samples=1.5", "data.streams=[{shards: a}]"], "data.epoch_samples must be int"),
])
def test_streams_settings_mistakes_are_one_line(settings, message):
    with pytest.raises(UserError, match=re.escape(message)) as e:
        load_config(None, settings)
    assert "\n" not in str(e.value)


def test_a_dump_loads_back_to_the_same_config(tmp_path):
    odd = "data.streams=[{shards: shards/fine, weight: 2.5}, {shards: 's3://bucket/coarse', split: 'no', " \
          "weight: 0.5}, {shards: 'a, b', split: train_extra}]"
    cfg = load_config(write(tmp_path, FILE + "  epoch_samples: 5000\n"), [odd])
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    again = load_config(saved)
    assert again == cfg and again.data.streams[1] == StreamCfg("s3://bucket/coarse", "no", 0.5)
    assert dump_config(again) == dump_config(cfg)


def test_an_old_config_dumps_as_before_plus_the_keys_added_since():
    """tests/data/old_stage's config.yaml was written by an older version: its dump now differs only by the
    keys added since (streams, epoch_samples, sampling, the parameter groups' settings, the trackers), at
    their defaults."""
    stored = (ROOT / "tests" / "data" / "old_stage" / "person" / "config.yaml").read_text()
    now = dump_config(load_config(ROOT / "tests" / "data" / "old_stage" / "person" / "config.yaml"))
    a, b = stored.splitlines(keepends=True), now.splitlines(keepends=True)
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    assert {op for op, *_ in ops} == {"equal", "insert"}
    added = [line for op, _, _, j1, j2 in ops if op == "insert" for line in b[j1:j2]]
    assert added == ["  streams: []\n", "  epoch_samples: 0\n", "  sampling: uniform\n",
                     "  rare_temperature: 0.01\n", "  rare_min_pixels: 3000\n", "  cat_max_ratio: 0.0\n",
                     "  no_decay: auto\n",
                     "  no_decay_names: []\n", "  encoder_lr_mult: 1.0\n", "  layer_decay: 1.0\n",
                     "  async_checkpoint: true\n", "  trackers: []\n", "  tracker_project: distseg\n",
                     "  mlflow_uri: ''\n"]
    assert now[now.index("  val_split:"):].startswith("  val_split: val\n  streams: []\n  epoch_samples: 0\n")


def test_credentials_in_a_streams_url_are_not_saved(tmp_path):
    secret = ["data.shards=s3://AKIAKEY:topsecret@bucket/fine",
              "data.streams=[{shards: 's3://AKIAKEY:topsecret@bucket/fine'}, {shards: "
              "'https://host/coarse?X-Amz-Signature=deadbeef&X-Amz-Credential=cred', split: train_extra}, "
              "{shards: 'https://user:pw@host/more'}]"]
    text = dump_config(load_config(None, secret))
    assert "topsecret" not in text and "deadbeef" not in text and "cred" not in text and "pw@" not in text
    saved = tmp_path / "config.yaml"
    saved.write_text(text)
    streams = load_config(saved).data.streams
    assert [s.shards for s in streams] == ["s3://AKIAKEY:***@bucket/fine", "https://host/coarse?***",
                                           "https://user:***@host/more"]
    assert load_config(saved).data.shards == "s3://AKIAKEY:***@bucket/fine"


def rows(table: str) -> dict[str, tuple[str, str]]:
    """`distseg config` lines by key: (the text before the note, the note)."""
    out = {}
    for line in table.splitlines():
        text, _, note = line.partition("  # ")
        out[text.split("=")[0].strip()] = (text.strip(), note)
    return out


def test_the_settings_table_documents_streams_and_shows_a_configs_readably(tmp_path):
    default = rows(settings_table())
    assert default["data.streams"][0] == "data.streams=[]" and default["data.epoch_samples"][0] == \
        "data.epoch_samples=0"
    assert "each {shards, split, weight}" in default["data.streams"][1]
    assert "data.val_split" in default["data.streams"][1]  # documented: validation does not read streams
    assert "x data.repeat" in default["data.epoch_samples"][1]  # the comment's continuation line too
    assert default["data.streams[].shards"] == ("data.streams[].shards",
                                                "folder or URL with <split>.json, as data.shards (required)")
    assert default["data.streams[].split"][1].endswith("(default train)")
    assert default["data.streams[].weight"][1].endswith("> 0 (default 1.0)")
    keys = list(default)
    assert keys[keys.index("data.streams"):keys.index("data.streams") + 5] == [
        "data.streams", "data.streams[].shards", "data.streams[].split", "data.streams[].weight",
        "data.epoch_samples"]
    # a config's streams: one flow list, which given back as a setting is the same streams
    cfg = load_config(None, ["data.streams=[{shards: 's3://b/x', split: 'no'}, {shards: 'a, b'}]"])
    table = settings_table(cfg)
    line = rows(table)["data.streams"][0]
    assert line == "data.streams=[{shards: 's3://b/x', split: 'no', weight: 1.0}, {shards: 'a, b', split: " \
                   "train, weight: 1.0}]"
    assert load_config(None, [line]).data.streams == cfg.data.streams
    # its length does not widen the other rows: they align as without it
    assert table.splitlines()[0] == settings_table().splitlines()[0]


ODD = [1, 2, 3, 7, 0.1, 0.25, 1 / 3, 2.5, 1e-3, 1e6]  # weights


def test_stream_shares_are_largest_remainder_and_sum_exactly():
    assert stream_shares([1, 1, 1], 10) == [4, 3, 3]  # the one left over to the earlier of equal remainders
    assert stream_shares([1, 1, 1], 11) == [4, 4, 3]
    assert stream_shares([3, 1], 3967) == [2975, 992]
    assert stream_shares([2.5], 7) == [7] and stream_shares([3, 1], 0) == [0, 0]
    # weights as written: quotas 0.5, 3.5, 1 tie exactly (in floats 0.1 + 0.7 + 0.2 < 1 tips it to stream 2)
    assert stream_shares([0.1, 0.7, 0.2], 5) == [1, 3, 1]
    # and the shares of weights as written are those of the same ratio in integers (the binary values of 0.3
    # and 0.1 would tip 1.5 : 0.5 to the second stream)
    for n in range(60):
        assert stream_shares([0.3, 0.1], n) == stream_shares([3, 1], n), n
        assert stream_shares([0.1, 0.7, 0.2], n) == stream_shares([1, 7, 2], n), n
    rng = random.Random(0)
    for _ in range(300):
        weights = [rng.choice(ODD) for _ in range(rng.randint(1, 5))]
        n = rng.randint(0, 10_000)
        shares = stream_shares(weights, n)
        exact = [n * Fraction(str(w)) / sum(Fraction(str(v)) for v in weights) for w in weights]
        assert sum(shares) == n and all(0 <= s - math.floor(q) <= 1 for s, q in zip(shares, exact))
        rest = [q - math.floor(q) for q in exact]
        bumped = [i for i, (s, q) in enumerate(zip(shares, exact)) if s > math.floor(q)]
        kept = [i for i in range(len(weights)) if i not in bumped]
        # every stream given one more had the larger remainder, or an equal one and came first
        assert all(rest[b] > rest[k] or (rest[b] == rest[k] and b < k) for b in bumped for k in kept)
    for bad in ([], [1, 0], [1, -2], [float("nan")]):
        with pytest.raises(ValueError):
            stream_shares(bad, 10)


def test_the_default_epoch_is_one_pass_over_the_first_stream_at_its_share():
    assert default_epoch_samples(2975, [3, 1]) == 3967  # 2975 / (3/4) = 3966.67
    assert stream_shares([3, 1], 3967)[0] == 2975
    assert default_epoch_samples(2975, [3, 1], 2) == 7933 and stream_shares([3, 1], 7933)[0] == 5950
    assert default_epoch_samples(10, [9, 1]) == 11 and stream_shares([9, 1], 11) == [10, 1]
    assert default_epoch_samples(100, [3, 1]) == 133 and stream_shares([3, 1], 133)[0] == 100
    # weights as written, exactly: 3 at 0.3:0.1 is 3 at 3:1, 3 / (3/4) = 4 (in floats, or the binary values of
    # 0.3 and 0.1, a hair above 4: 5)
    assert default_epoch_samples(3, [0.3, 0.1]) == default_epoch_samples(3, [3, 1]) == 4
    assert default_epoch_samples(21, [7, 3]) == 30  # 21 / 0.7 is 30.000000000000004 in floats
    assert default_epoch_samples(2975, [1]) == 2975 and default_epoch_samples(0, [1, 1]) == 0
    rng = random.Random(1)
    for _ in range(300):
        weights = [rng.choice(ODD) for _ in range(rng.randint(1, 5))]
        size, repeat = rng.randint(1, 5000), rng.randint(1, 3)
        n = default_epoch_samples(size, weights, repeat)
        assert stream_shares(weights, n)[0] == size * repeat, (size, weights, repeat)  # exactly repeat passes
    with pytest.raises(ValueError):
        default_epoch_samples(10, [0, 1])
