"""The config layer's weighted training streams (data.streams, data.epoch_samples): read from a config file or
a YAML flow list override alike, every mistake one line naming the entry, saved so that it loads back (with
credentials removed from every stream's URL), shown by `distseg config`; and the epoch's shares."""

import difflib
import re

import pytest

from conftest import ROOT
from distseg.config import Config, StreamCfg, dump_config, load_config, settings_table
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


ENTRY_MISTAKES = [
    ("- {shards: a}\n    - {shards: b, weight: -1}", "data.streams[1].weight must be > 0, got -1"),
    ("- {shards: a, weight: 0}", "data.streams[0].weight must be > 0, got 0"),
    ("- {shards: a, weight: .nan}", "data.streams[0].weight must be > 0, got nan"),
    ("- {shards: a, weight: .inf}", "data.streams[0].weight must be finite, got inf"),
    ("- {shards: a, weight: abc}", "data.streams[0].weight must be a number, got 'abc'"),
    ("- {shards: a, weight: '3'}", "data.streams[0].weight must be a number, got '3'"),
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


def test_a_config_without_streams_dumps_as_before_plus_the_two_keys():
    """tests/data/old_stage's config.yaml was written by an older version: its dump now differs only by the
    keys added since, streams and epoch_samples among them, at their defaults."""
    stored = (ROOT / "tests" / "data" / "old_stage" / "person" / "config.yaml").read_text()
    now = dump_config(load_config(ROOT / "tests" / "data" / "old_stage" / "person" / "config.yaml"))
    a, b = stored.splitlines(keepends=True), now.splitlines(keepends=True)
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    assert {op for op, *_ in ops} == {"equal", "insert"}
    added = [line for op, _, _, j1, j2 in ops if op == "insert" for line in b[j1:j2]]
    assert added == ["  streams: []\n", "  epoch_samples: 0\n", "  async_checkpoint: true\n"]
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
