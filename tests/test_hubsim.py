"""tests/hubsim.py: the real huggingface_hub and datasets clients read hub datasets from a FakeHub."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hubsim import FakeHub, hub_env, use_endpoint

REPO = "owner/name"
LINES = "owner/lines"
SIZES = (5, 7, 4)  # rows of each parquet file


def _parquet_files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    files = []
    for k, n in enumerate(SIZES):
        f = folder / f"train-{k:05d}-of-{len(SIZES):05d}.parquet"
        table = pa.table({"text": [f"file {k} row {i} " + "x" * i for i in range(n)], "n": list(range(n))})
        pq.write_table(table, f, row_group_size=2)
        files.append(f)
    return files


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "hub"
    _parquet_files(root / REPO / "data")
    lines = root / LINES / "data"
    lines.mkdir(parents=True)
    for k in range(2):
        rows = [json.dumps({"text": f"line {k}.{i}"}) + "\n" for i in range(3)]
        (lines / f"train-{k:05d}-of-00002.jsonl").write_text("".join(rows))
    return root


@pytest.fixture
def hub(root, tmp_path):
    """A started FakeHub that this process's huggingface_hub and datasets use, with a fresh HF_HOME."""
    fake = FakeHub(root)
    with fake as endpoint, use_endpoint(endpoint, home=tmp_path / "hf"):
        yield fake
    assert fake.unserved == []


def _local_rows(files: list[Path]) -> list[dict]:
    import datasets

    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)
    return list(ds)


def test_dataset_info_revisions_and_errors(hub, root):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    sha = hub.sha(REPO)
    assert re.fullmatch("[0-9a-f]{40}", sha)
    assert api.dataset_info(REPO, revision=None).sha == sha
    assert api.dataset_info(REPO, revision="main").sha == sha
    assert api.dataset_info(REPO, revision=sha).sha == sha
    assert hub.sha(LINES) != sha
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info("owner/missing")
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info("missing")
    with pytest.raises(RevisionNotFoundError):
        api.dataset_info(REPO, revision="v9")

    (root / REPO / "data" / "train-00001-of-00003.parquet").write_bytes(b"changed")
    assert hub.sha(REPO) != sha  # a new commit: the old sha is gone, as a moved branch would leave it
    assert api.dataset_info(REPO).sha == hub.sha(REPO)
    with pytest.raises(RevisionNotFoundError):
        api.dataset_info(REPO, revision=sha)


@pytest.mark.parametrize("revision", ["sha", None])
def test_streaming_parquet_matches_local_files(hub, root, revision):
    import datasets

    files = sorted((root / REPO / "data").iterdir())
    rev = hub.sha(REPO) if revision == "sha" else None
    ds = datasets.load_dataset(REPO, name=None, split="train", revision=rev, streaming=True)
    assert ds.n_shards == len(files)
    assert list(ds) == _local_rows(files)
    for k, f in enumerate(files):
        assert list(ds.shard(num_shards=ds.n_shards, index=k)) == _local_rows([f])
    read = {path for repo, path, _, _ in hub.reads}
    assert read == {f"data/{f.name}" for f in files}


def test_streaming_jsonl(hub, root):
    import datasets

    ds = datasets.load_dataset(LINES, split="train", revision=hub.sha(LINES), streaming=True)
    assert ds.n_shards == 2
    assert [r["text"] for r in ds] == [f"line {k}.{i}" for k in range(2) for i in range(3)]
    assert [r["text"] for r in ds.shard(num_shards=2, index=1)] == [f"line 1.{i}" for i in range(3)]


def test_resolve_headers_and_ranges(hub, root):
    import httpx
    from huggingface_hub import HfFileSystem, hf_hub_download

    path = "data/train-00002-of-00003.parquet"
    data = (root / REPO / path).read_bytes()
    sha = hub.sha(REPO)
    url = f"{os.environ['HF_ENDPOINT']}/datasets/{REPO}/resolve/main/{path}"
    head = httpx.head(url)
    assert head.status_code == 200 and head.headers["X-Repo-Commit"] == sha
    assert head.headers["Content-Length"] == head.headers["X-Linked-Size"] == str(len(data))
    assert head.headers["ETag"].strip('"') == head.headers["X-Linked-Etag"].strip('"')

    part = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    tail = httpx.get(url, headers={"Range": "bytes=-8"})
    assert tail.status_code == 206 and tail.content == data[-8:]
    assert httpx.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416

    served = hub.bytes_served
    with HfFileSystem().open(f"datasets/{REPO}@{sha}/{path}", block_size=16) as f:
        f.seek(100)
        assert f.read(10) == data[100:110]
    assert hub.bytes_served - served < len(data)  # a block, not the file
    assert Path(hf_hub_download(REPO, path, repo_type="dataset", revision=sha)).read_bytes() == data


SUBPROCESS = """
import json, sys
import datasets, huggingface_hub
sha = huggingface_hub.HfApi().dataset_info(sys.argv[1]).sha
ds = datasets.load_dataset(sys.argv[1], split="train", revision=sha, streaming=True)
last = list(ds.shard(num_shards=ds.n_shards, index=ds.n_shards - 1))
print(json.dumps({"sha": sha, "n_shards": ds.n_shards, "rows": list(ds), "last": last}))
"""


def test_subprocess_reaches_hub_by_env_alone(root, tmp_path):
    files = sorted((root / REPO / "data").iterdir())
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    fake = FakeHub(root)
    with fake as endpoint:
        out = subprocess.run(
            [sys.executable, "-c", SUBPROCESS, REPO],
            env=env | hub_env(endpoint, home=tmp_path / "hf"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["sha"] == fake.sha(REPO)
    assert fake.unserved == []
    assert got["n_shards"] == len(files)
    assert got["rows"] == _local_rows(files)
    assert got["last"] == _local_rows(files[2:])
