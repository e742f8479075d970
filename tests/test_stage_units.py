"""Units of work: a source's input files staged apart (in this process, or as Ray tasks on a local Ray
cluster) give the same bytes, whatever runs them in whatever order; a max_tokens cap lands on the same
document either way; a finished unit is not staged again."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.config import DEFAULT_CORPUS, DataConfig
from model.shards import read_jsonl_texts, read_shard
from model.store import open_store
from model.tokenizer import Tokenizer
from orchestrator.stage import stage
from orchestrator.stage_unit import UNITS, InProcess, RayUnits

FILES = 5
SHARD = 2048


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("LMCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory) -> Path:
    """FILES parquet files of consecutive corpus documents (a hub dataset's layout, in small)."""
    docs = [d for d in read_jsonl_texts(DEFAULT_CORPUS) if d.strip()][:200]
    folder = tmp_path_factory.mktemp("src") / "data"
    folder.mkdir()
    per = len(docs) // FILES
    for k in range(FILES):
        part = docs[k * per : (k + 1) * per]
        pq.write_table(pa.table({"text": part}), folder / f"train-{k:05d}-of-{FILES:05d}.parquet")
    return folder


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, parquet_folder) -> Path:
    texts = [t for f in sorted(parquet_folder.iterdir()) for t in pq.read_table(f)["text"].to_pylist()]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(texts, 400).save(path)
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs in this process: two units at once, finishing in any order."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2)
    yield
    ray.shutdown()


def objects(store: str, prefix: str) -> dict[str, bytes]:
    """Every object of a staged dataset (what the store lists) by its key; stage.json without its timing."""
    s = open_store(store)
    out = {k.removeprefix(f"{prefix}/"): s.get_bytes(k) for k in s.list(prefix)}
    info = json.loads(out.pop("stage.json"))
    info.pop("seconds")
    return out | {"stage.json": json.dumps(info).encode()}


def staged(tmp_path: Path, store: str, spec: DataConfig, runner=None):
    r = stage(spec, f"file://{tmp_path / store}", unit_bytes=1, runner=runner, batch_chars=4000)
    return r, objects(f"file://{tmp_path / store}", f"datasets/{r.content_hash}")


def test_units_in_this_process_and_as_ray_tasks_are_the_same_bytes(
    tmp_path, parquet_folder, tok_path, ray_cluster
):
    spec = DataConfig(dataset=str(parquet_folder), tokenizer=str(tok_path), shard_tokens=SHARD)
    one, here = staged(tmp_path, "here", spec)
    two, spread = staged(tmp_path, "ray", spec, RayUnits())
    assert RayUnits().slots == 2
    assert one.content_hash == two.content_hash and here == spread
    assert sorted(k for k in here if k.startswith(f"{UNITS}/")) == [
        f"{UNITS}/{k:05d}.json" for k in range(FILES)
    ]
    m = one.manifest
    assert [i.name.split("_")[1] for i in m.train] == sorted(i.name.split("_")[1] for i in m.train)
    assert {i.name.split("_")[1] for i in m.train} == {f"{k:05d}" for k in range(FILES)}
    # the tokens are every document of every file, in file order
    tok = Tokenizer.load(tok_path)
    texts = [t for f in sorted(parquet_folder.iterdir()) for t in pq.read_table(f)["text"].to_pylist()]
    folder = tmp_path / "here" / "datasets" / one.content_hash
    ids = [int(x) for s in m.train + m.val for x in read_shard(folder / s.name)]
    assert len(ids) == sum(len(tok.encode(t)) + 1 for t in texts) == one.tokens
    assert one.documents == len(texts)


def test_a_cap_lands_on_the_same_document_whoever_stages(tmp_path, parquet_folder, tok_path, ray_cluster):
    full = stage(
        DataConfig(dataset=str(parquet_folder), tokenizer=str(tok_path), shard_tokens=SHARD),
        f"file://{tmp_path / 'full'}",
        unit_bytes=1,
    )
    cap = full.tokens * 3 // 5 + 17  # inside the third file
    spec = DataConfig(
        dataset=str(parquet_folder), tokenizer=str(tok_path), shard_tokens=SHARD, max_tokens=cap
    )
    one, here = staged(tmp_path, "here", spec)
    two, spread = staged(tmp_path, "ray", spec, RayUnits())
    assert here == spread
    tok = Tokenizer.load(tok_path)
    longest = max(
        len(tok.encode(t)) + 1 for f in parquet_folder.iterdir() for t in pq.read_table(f)["text"].to_pylist()
    )
    assert cap <= one.tokens < cap + longest
    record = lambda k: json.loads(here[f"{UNITS}/{k:05d}c{cap}.json"])  # noqa: E731
    before = sum(i["tokens"] for k in range(2) for split in ("train", "val") for i in record(k)[split])
    units = json.loads(here["stage.json"])["units"]
    assert units == [
        f"00000c{cap}",
        f"00001c{cap}",
        f"00002c{cap - before}",
    ]  # the third, cut at what is left


def test_a_finished_unit_is_not_staged_again(tmp_path, parquet_folder, tok_path, monkeypatch):
    spec = DataConfig(dataset=str(parquet_folder), tokenizer=str(tok_path), shard_tokens=SHARD)
    first, want = staged(tmp_path, "s", spec)
    folder = tmp_path / "s" / "datasets" / first.content_hash
    (folder / "manifest.json").unlink()  # as if killed after the units, before the commit
    (folder / f"{UNITS}/00003.json").unlink()  # ... and before unit 3 was recorded
    ran: list[str] = []
    real = InProcess.wait_any

    def spy(self, pending):
        handle, record = real(self, pending)
        ran.append((record.label, bool(record.uploaded)))
        return handle, record

    monkeypatch.setattr(InProcess, "wait_any", spy)
    again, got = staged(tmp_path, "s", spec)
    assert got == want and not again.reused
    assert [label for label, sent in ran if sent] == ["00003"]  # only its record was sent again
    assert sorted(again.skipped) == sorted(
        i.name for i in first.manifest.train + first.manifest.val if "_00003_" in i.name
    )


def test_a_cloud_run_stages_hub_sources_on_its_nodes_pinned_to_their_commits(tmp_path, parquet_folder):
    """Which runs stage on their own nodes (hub sources only), and the revisions they get pinned to: each
    source of a mixture its own repo's commit, so every node and every recovery stages the same bytes."""
    import shutil

    from hubsim import FakeHub, use_endpoint

    from model.config import resolve
    from orchestrator.stage import pin_revisions, stages_in_the_cloud

    for repo in ("org/a", "org/b"):
        shutil.copytree(parquet_folder, tmp_path / "hub" / repo / "data")
    (tmp_path / "hub" / "org" / "b" / "data" / "extra.parquet").write_bytes(
        (parquet_folder / f"train-00000-of-{FILES:05d}.parquet").read_bytes()
    )  # another file: another commit
    hub = FakeHub(tmp_path / "hub")
    mixture = [{"dataset": "org/a", "weight": 0.7}, {"dataset": "org/b", "weight": 0.3}]
    with hub as endpoint, use_endpoint(endpoint, home=tmp_path / "hf"):
        one = resolve("tiny", ["data.dataset=org/a"])
        assert stages_in_the_cloud(one)
        assert pin_revisions(one).data.revision == hub.sha("org/a")
        pinned = pin_revisions(with_mixture(one, mixture)).data.mixture
        assert [s.revision for s in pinned] == [hub.sha("org/a"), hub.sha("org/b")]
        assert hub.sha("org/a") != hub.sha("org/b") and hub.reads == []
    assert not stages_in_the_cloud(resolve("tiny"))  # the shipped corpus is a local file: staged here
    local_too = with_mixture(one, [*mixture, {"dataset": str(DEFAULT_CORPUS)}])
    assert not stages_in_the_cloud(local_too)  # a mixture with a local source is staged here, whole


def with_mixture(spec, sources: list[dict]):
    data = {**spec.data.model_dump(), "mixture": sources}
    return type(spec).model_validate({**spec.model_dump(), "data": data})
