"""Shards from anywhere, with real servers on 127.0.0.1 (moto's S3 server, Python's http.server): sharding
uploads to S3 with the manifest last and resumes; training from s3:// and http:// gives the weights of local
disk; a killed download never leaves a usable partial shard; transient faults are survived, permanent ones
are one line naming the URL; a flipped byte is caught; nothing from storage or in URLs leaks or escapes the
cache; a damaged newest checkpoint falls back to the previous one."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from servers import http_files, moto_s3

from conftest import SGD, TRAIN, assert_user_error, base_overrides, run_cli, run_train, split_keys, weights
from distseg.errors import UserError
from distseg.shards.manifest import load_manifest
from distseg.shards.shard_reader import ShardFiles

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server and a bucket; the test process talks to it through the same environment."""
    pytest.importorskip("s3fs")
    with moto_s3() as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            import fsspec

            fs = fsspec.filesystem("s3", skip_instance_cache=True)
            fs.mkdir("bkt")
            yield env, fs
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def s3_shards(s3, synth_root):
    """train + val shards uploaded by `distseg shard --out s3://...` (same settings as the local fixture)."""
    env, _ = s3
    for split, maxcount in (("train", 4), ("val", 2)):
        run_cli("shard", "--split", split, "--root", synth_root, "--out", "s3://bkt/synth", "--maxcount",
                maxcount,
                env=env)
    return "s3://bkt/synth"


def test_shard_to_s3_uploads_manifest_last_and_resumes(s3, synth_root, shards, tmp_path):
    env, fs = s3
    url = "s3://bkt/killed"
    proc = subprocess.Popen([sys.executable, "-m", "distseg", "shard", "--split", "train", "--root",
                             str(synth_root),
                             "--out", url, "--maxcount", "4"], env=dict(os.environ,
                                                                        DISTSEG_SHARD_THROTTLE="0.3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    def listed() -> int:  # shards the remote state says are uploaded
        fs.invalidate_cache()
        try:
            return len(json.loads(fs.cat("bkt/killed/train.state.json"))["shards"])
        except FileNotFoundError:
            return 0
    deadline = time.time() + 120
    while time.time() < deadline and listed() < 1:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[1] for p in fs.ls("bkt/killed")}
    assert "train-000000.tar" in names and "train.json" not in names, names  # no manifest before its shards
    assert "train-000000.counts.npy" in names and "train.counts.npy" not in names  # counts beside each shard
    p = run_cli("shard", "--split", "train", "--root", synth_root, "--out", url, "--maxcount", "4", env=env)
    assert "resuming: " in p.stdout
    fs.invalidate_cache()
    local = json.loads((shards / "train.json").read_text())
    remote = json.loads(fs.cat("bkt/killed/train.json"))
    assert [(s["name"], s["sha256"]) for s in remote["shards"]] == [(s["name"],
                                                                     s["sha256"]) for s in local["shards"]]
    for sh in local["shards"]:  # byte-identical to sharding onto local disk, index hashes recorded
        assert fs.cat(f"bkt/killed/{sh['name']}") == (shards / sh["name"]).read_bytes()
        assert len(sh["index_sha256"]) == 64
    assert not fs.exists("bkt/killed/train.state.json")
    # the counts of the shards uploaded before the kill came back from the bucket: the same split file
    assert fs.cat("bkt/killed/train.counts.npy") == (shards / "train.counts.npy").read_bytes()
    assert remote["class_counts"] == local["class_counts"]
    assert not [p for p in fs.ls("bkt/killed") if re.fullmatch(r".*/train-\d+\.counts\.npy", p)]  # removed


def test_train_from_s3_and_http_equals_local_disk(s3, s3_shards, shards, one_proc_run, tmp_path):
    env, _ = s3
    cache = tmp_path / "cache"
    run_train(base_overrides(s3_shards, tmp_path, "s3", **SGD,
                             **{"data.cache_dir": cache, "data.cache_size": "10M"}))
    with http_files(shards) as (base, faults):
        faults.fail_first["/train-000001.tar"] = 2  # a server that fails twice, then answers
        secret = base.replace("http://", "http://user:s3cret@")
        p = run_train(base_overrides(secret, tmp_path, "http", **SGD, **{"data.cache_dir": tmp_path / "c2",
                                                                        "data.num_workers": 1}))
        assert faults.requests["/train-000001.tar"] == 3
    ref = weights(one_proc_run)
    for run in ("s3", "http"):
        w = weights(tmp_path / run)
        for k in ref:
            assert torch.equal(ref[k], w[k]), (run, k)
    # the cache holds hash-named copies only, within its limit; no password anywhere a user or TB sees
    names = sorted(f.name for f in cache.iterdir())
    named = (r"[0-9a-f]{40}\.(tar|idx)(\.lock|\.used)?|\.evict\.lock|stamps"  # cache entries, shard stamps
             r"|(train|val)-[0-9a-f]{20}\.dsidx(\.lock)?")  # the sample index, named by the manifest's hash
    assert all(re.fullmatch(named, n) for n in names), names
    assert sum(f.stat().st_size for f in cache.iterdir()) <= 10 << 20
    seen = p.stdout + p.stderr + (tmp_path / "http" / "config.yaml").read_text()
    tb_files = [f for f in (tmp_path / "http" / "tb").rglob("*") if f.is_file()]
    seen += "".join(f.read_bytes().decode("latin-1") for f in tb_files)
    assert "s3cret" not in seen and "user:***@127.0.0.1" in (tmp_path / "http" / "config.yaml").read_text()


def test_killed_download_leaves_no_partial_shard_and_flipped_bytes_are_refused(shards, tmp_path):
    from distseg.shards.storage import ShardCache, StorageError

    sh = json.loads((shards / "train.json").read_text())["shards"][0]
    cache_dir = tmp_path / "cache"
    with http_files(shards) as (base, faults):
        faults.slow["/train-000000.tar"] = 0.5
        script = (f"from distseg.shards.storage import ShardCache; "
                  f"ShardCache({str(cache_dir)!r}).fetch({base + '/train-000000.tar'!r}, {sh['sha256']!r})")
        proc = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.time() + 60
        while time.time() < deadline and not list(cache_dir.glob("*.part-*")):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cache = ShardCache(cache_dir)  # a new user of the cache: the dead process's temp file is swept
        url = base + "/train-000000.tar"
        assert not cache.path_for(url).exists() and not list(cache_dir.glob("*.part-*"))
        faults.slow.clear()
        faults.flip.add("/train-000000.tar")  # a damaged transfer, every time
        before = faults.requests.get("/train-000000.tar", 0)
        with pytest.raises(StorageError, match="fails its sha256 check"):
            cache.fetch(url, sh["sha256"])
        assert faults.requests["/train-000000.tar"] - before == 2  # one download, one more after a mismatch
        assert not cache.path_for(url).exists()
        faults.flip.clear()
        path = cache.fetch(url, sh["sha256"])
        assert path.read_bytes() == (shards / "train-000000.tar").read_bytes()


def test_storage_faults_are_one_line_naming_the_url(s3, shards, tmp_path):
    env, _ = s3
    with pytest.raises(UserError, match="no manifest s3://bkt/nothing/train.json"):
        load_manifest("s3://bkt/nothing/train.json")
    wrong = dict(env, AWS_ENDPOINT_URL="http://127.0.0.1:9")  # nothing listens there
    assert_user_error(run_cli("inspect", "s3://bkt/synth/train.json", env=wrong, check=False),
                      "cannot read s3://bkt/synth/train.json after 5 tries")
    with http_files(shards) as (base, faults):
        faults.deny.add("/train.json")
        with pytest.raises(UserError, match=f"access denied to {base}/train.json"):
            load_manifest(f"{base}/train.json")
        faults.deny.clear()
        faults.always_fail.add("/train-000002.tar")
        cache = tmp_path / "cache"
        p = run_train(base_overrides(base, tmp_path, "r", **{"data.cache_dir": cache, "data.retries": 3}),
                      check=False)
        assert_user_error(p, f"cannot read {base}/train-000002.tar after 3 tries (503")
        assert not [f for f in cache.iterdir() if ".part-" in f.name]
        assert len([f for f in cache.glob("*.tar")]) < 4  # nothing half-written, the failing shard absent
        with pytest.raises(UserError, match="data.shards is remote"):
            ShardFiles(load_manifest(base, "train"))


def test_file_urls_are_local_paths(synth_root, shards, tmp_path):
    assert "14 samples in 4 shards" in run_cli("inspect", f"file://{shards}/train.json", "--verify").stdout
    run_cli("shard", "--split", "val", "--root", synth_root, "--out", f"file://{tmp_path}/out")
    assert json.loads((tmp_path / "out" / "val.json").read_text())["total"] == 5


def test_a_flipped_byte_is_caught_in_a_worker_also_after_the_shard_was_stamped(shards, tmp_path):
    """A local shard that changes after a run stamped it (same size, still decodes) is hashed again and
    refused; the error comes from a DataLoader worker, as the one line the main process would print."""
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    ov = {"data.num_workers": 1, "data.cache_dir": tmp_path / "node", "train.max_steps": 1}
    run_train(base_overrides(bad, tmp_path, "good", **ov))
    assert len(list((tmp_path / "node" / "stamps").glob("*.json"))) >= 4  # the shards it read, stamped
    tar = bad / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[3000] ^= 0x01  # inside the first sample's JPEG: same size, still decodes
    tar.write_bytes(bytes(data))
    p = run_train(base_overrides(bad, tmp_path, "r", **ov), check=False)
    assert_user_error(p, f"shard {tar} fails its sha256 check")


def test_a_damaged_remote_shard_in_a_worker_under_the_launcher_is_one_line(shards, tmp_path):
    with http_files(shards) as (base, faults):
        faults.flip.add("/train-000002.tar")  # every download of it arrives with one byte flipped
        args = base_overrides(base, tmp_path, "r", **{"data.num_workers": 1,
                                                      "data.cache_dir": tmp_path / "c"})
        p = subprocess.run([sys.executable, "-m", "distseg.launch", "--num_processes", "1", "--num_machines",
                            "1", "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN, *args],
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                           timeout=600)
    assert_user_error(p, f"{base}/train-000002.tar fails its sha256 check")
    assert "Caught" not in p.stderr and "DataLoader worker" not in p.stderr


def test_each_shard_is_hashed_once_per_node(shards, tmp_path):
    """2 ranks x 2 DataLoader workers (and the val loaders) read the shards; before the node-local stamps
    every one of those processes hashed every shard it read. A sitecustomize logs each hash."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    site, log = tmp_path / "site", tmp_path / "hashes.log"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\nimport distseg.files as files\n_hash = files.sha256_file\n\n"
        "def logged(path):\n    with open(os.environ['DISTSEG_TEST_HASH_LOG'], 'a') as f:\n"
        "        f.write(f'{os.getpid()} {path}\\n')\n    return _hash(path)\n\nfiles.sha256_file = logged\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "DISTSEG_TEST_HASH_LOG": str(log)}
    run_train(base_overrides(copy, tmp_path, "r", **{"data.num_workers": 2, "data.batch_size": 2,
                                                     "data.cache_dir": tmp_path / "node", "train.epochs": 1}),
              procs=2, env=env)
    hashed = [line.split(" ", 1) for line in log.read_text().splitlines()]
    shards_hashed = [path for _, path in hashed if path.endswith(".tar")]
    every = sorted(str(p) for p in copy.glob("*.tar"))
    assert sorted(shards_hashed) == every, shards_hashed  # each shard of both splits, once


def _corrupt_one_sample(shards, dst):
    """A shard whose first JPEG is garbage, with the manifest updated to match: damaged at the source."""
    from distseg.files import sha256_file

    shutil.copytree(shards, dst)
    man = json.loads((dst / "train.json").read_text())
    sh = man["shards"][0]
    with tarfile.open(dst / sh["name"]) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".jpg"))
    data = bytearray((dst / sh["name"]).read_bytes())
    data[member.offset_data:member.offset_data + member.size] = b"\0" * member.size
    (dst / sh["name"]).write_bytes(bytes(data))
    sh["sha256"] = sha256_file(dst / sh["name"])
    (dst / "train.json").write_text(json.dumps(man))
    return member.name.split(".", 1)[0], sh["name"], man


def test_undecodable_sample_is_an_error_or_skipped_and_counted(shards, tmp_path):
    from distseg.config import load_config
    from distseg.data.torch_loader import TorchLoader
    from distseg.labels import get_scheme
    from distseg.shards.split import open_split

    key, name, man = _corrupt_one_sample(shards, tmp_path / "s")
    p = run_train(base_overrides(tmp_path / "s", tmp_path, "r"), check=False)
    assert_user_error(p, f"sample {key} in shard {name} cannot be decoded")
    p = run_train(base_overrides(tmp_path / "s", tmp_path, "skip", **{"data.on_corrupt": "skip"}))
    assert "epoch 1: 1 sample(s) could not be decoded and were left out" in p.stdout
    every = sorted(split_keys(shards))
    for world in (1, 2):
        cfg = load_config(None, [f"data.shards={tmp_path / 's'}", "data.batch_size=3", "data.num_workers=1",
                                 "data.crop=[64,96]", "data.on_corrupt=skip"])
        opened = open_split(tmp_path / "s", "train", get_scheme("trainid"))
        loaders = [TorchLoader(cfg.data, 0, opened, True, "cpu", world, r) for r in range(world)]
        got, lengths = [], set()
        for L in loaders:
            L.set_epoch(0)
            batches = list(L)
            lengths.add(len(batches))
            got += [k for b in batches for k, v in zip(b["key"], b["valid"].tolist()) if v]
        assert len(lengths) == 1 and sorted(got) == [k for k in every if k != key]


def test_names_from_storage_are_never_paths(shards, tmp_path):
    bad = tmp_path / "s"
    shutil.copytree(shards, bad)
    man = json.loads((bad / "train.json").read_text())
    man["shards"][0]["name"] = "../../../etc/passwd"
    (bad / "train.json").write_text(json.dumps(man))
    with pytest.raises(UserError, match="invalid shard name '../../../etc/passwd'"):
        load_manifest(bad, "train")
    with http_files(bad) as (base, _), pytest.raises(UserError, match="invalid shard name"):
        load_manifest(base, "train")


def test_bench_data_reports_shuffle_share_and_remote_cache(shards):
    from conftest import run_cli as cli

    with http_files(shards) as (base, _):
        p = cli("bench", "data", "--modes", "", "--shards", base, "--batches", "2", "--repeats", "1",
                f"data.shards={shards}", "data.batch_size=2", "data.num_workers=0", "data.crop=[64,128]",
                "data.shuffle_window=1")
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in p.stdout.splitlines()
            if line.startswith("| ")}
    # 14 samples in 4 shards, 2 ranks: the global shuffle reads every shard on each rank, `shards` about half
    glob, shard = rows[("global", "2")], rows[("shards", "2")]
    assert "100%" in glob and float(shard.split("|")[4].strip().rstrip("%")) <= 75
    assert float(glob.split("|")[5]) > float(shard.split("|")[5])  # neighbours spread further globally
    names = [line.split("|")[1].strip() for line in p.stdout.splitlines() if line.startswith("| remote")
             or line.startswith("| local")]
    assert names == ["local shards", "remote, cold cache", "remote, warm cache"]
    cold = [line for line in p.stdout.splitlines() if line.startswith("| remote, cold")][0]
    assert float(cold.split("|")[4]) > 0  # the cold run downloaded


def test_dali_reads_remote_shards_from_the_cache(shards, tmp_path):
    pytest.importorskip("nvidia.dali")
    from distseg.config import load_config
    from distseg.data.dali_loader import DaliLoader
    from distseg.labels import get_scheme
    from distseg.shards.split import open_split

    with http_files(shards) as (base, _):
        cfg = load_config(None, [f"data.shards={base}", f"data.cache_dir={tmp_path / 'c'}",
                                 "data.crop=[64,96]", "data.batch_size=4", "data.num_workers=1"])
        opened = open_split(base, "train", get_scheme("trainid"))
        keys = []
        L = DaliLoader(cfg.data, cfg.train.seed, opened, True, "cpu", 1, 0)
        for b in L:
            keys += [k for k, v in zip(b["key"], b["valid"].tolist()) if v]
    assert sorted(keys) == sorted(split_keys(shards))
    assert len(list((tmp_path / "c").glob("*.tar"))) == len(opened.manifest["shards"])
    cfg.data.cache_size = "1K"
    with pytest.raises(Exception, match="must hold"):
        DaliLoader(cfg.data, cfg.train.seed, opened, True, "cpu", 1, 0)


def test_stamps_spare_a_second_hash_unless_verify_is_always(shards, tmp_path, monkeypatch):
    from distseg.shards import shard_reader

    hashed = []
    real = shard_reader.sha256_file
    monkeypatch.setattr(shard_reader, "sha256_file", lambda p: hashed.append(p) or real(p))
    man = load_manifest(shards, "train")
    for _ in range(2):  # two processes of one node
        ShardFiles(man, str(tmp_path / "node")).tar(0)
    assert len(hashed) == 1
    for _ in range(2):
        ShardFiles(man, str(tmp_path / "node"), verify="always").tar(0)
    assert len(hashed) == 3


def test_two_threads_stamping_one_shard_both_succeed(shards, tmp_path):
    """The prefetch thread and the main thread may stamp the same downloaded shard at once: each writes
    its own temp file, so neither renames the other's away (the race CI hit as a missing `.json.tmpPID`)."""
    import threading

    from distseg.shards.shard_reader import Stamps

    stamps, shard = Stamps(tmp_path / "node"), shards / "train-000000.tar"
    sha = load_manifest(shards, "train")["shards"][0]["sha256"]
    errors, start = [], threading.Barrier(4)

    def stamp():
        start.wait()
        try:
            for _ in range(200):
                stamps.record(shard, sha)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=stamp) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert stamps.check(shard, sha)
    assert [p.name for p in (tmp_path / "node" / "stamps").iterdir() if ".tmp" in p.name] == []
