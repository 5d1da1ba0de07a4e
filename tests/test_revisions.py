"""The revision store: append-only history, retention, momentum, and one writer across processes."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from cnnserve.errors import ConflictError, NotFoundError
from cnnserve.serving.revisions import AbstractRevisionStore, FileRevisionStore, RevisionStore
from cnnserve.weights import save_weights


def make_store(tmp_path: Path, retention: int = 3) -> RevisionStore:
    base = tmp_path / "base.safetensors"
    sha = save_weights({"w": torch.zeros(3)}, base)
    return RevisionStore(tmp_path / "store", "m", "1.0", sha, base, retention=retention)


def test_base_is_revision_zero(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert store.head() == (0, store.base_sha256)
    assert torch.equal(store.load(store.get(0))["w"], torch.zeros(3))
    assert store.directory.name.startswith("1.0-")


def test_append_step_rollback_reset(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with store.locked():
        first = store.append(
            "step", parent=0, step=1, weights={"w": torch.ones(3)}, request_id="r1", result={"x": 1}
        )
        second = store.append("step", parent=1, step=2, weights={"w": torch.full((3,), 2.0)})
        back = store.append("rollback", parent=2, step=first.step, same_as=first)
        reset = store.append("reset", parent=3, step=0, same_as=store.get(0))
    assert [r.revision for r in store.revisions()] == [0, 1, 2, 3, 4]
    assert store.head() == (4, store.base_sha256)
    assert back.sha256 == first.sha256 and back.file == first.file
    assert torch.equal(store.load(store.get(3))["w"], torch.ones(3))
    assert torch.equal(store.load(second)["w"], torch.full((3,), 2.0))
    assert reset.file is None
    found = store.find_request("r1")
    assert found is not None and found.result == {"x": 1, "revision": 1}


def test_retention_prunes_files_nothing_refers_to(tmp_path: Path) -> None:
    store = make_store(tmp_path, retention=2)
    with store.locked():
        for number in range(1, 5):
            store.append(
                "step", parent=number - 1, step=number, weights={"w": torch.full((3,), float(number))}
            )
    kept = {r.revision: r.pruned for r in store.revisions()}
    assert kept == {0: False, 1: True, 2: True, 3: False, 4: False}
    assert sorted(p.name for p in store.directory.glob("rev-*")) == [
        "rev-000003.safetensors",
        "rev-000004.safetensors",
    ]
    with pytest.raises(NotFoundError, match=r"pruned \(kept: 0, 3-4\)"):
        store.get(1)
    with pytest.raises(NotFoundError, match="does not exist"):
        store.get(9)


def test_a_rollback_keeps_its_target_file_alive(tmp_path: Path) -> None:
    store = make_store(tmp_path, retention=2)
    with store.locked():
        first = store.append("step", parent=0, step=1, weights={"w": torch.ones(3)})
        store.append("step", parent=1, step=2, weights={"w": torch.zeros(3) + 5})
        store.append("rollback", parent=2, step=1, same_as=first)
        store.append("step", parent=3, step=2, weights={"w": torch.zeros(3) + 7})
    assert store.get(3).file == "rev-000001.safetensors"
    assert (store.directory / "rev-000001.safetensors").exists()
    assert not (store.directory / "rev-000002.safetensors").exists()


def test_momentum_belongs_to_its_revision(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with store.locked():
        store.append(
            "step", parent=0, step=1, weights={"w": torch.ones(3)}, momentum={"w": torch.full((3,), 0.5)}
        )
    assert torch.equal(store.load_momentum(1)["w"], torch.full((3,), 0.5))
    assert store.load_momentum(0) == {}
    with store.locked():
        store.append("reset", parent=1, step=0, same_as=store.get(0))
    assert store.load_momentum(2) == {}


def test_store_reopens_with_its_history(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with store.locked():
        store.append("step", parent=0, step=1, weights={"w": torch.ones(3)})
    again = RevisionStore(tmp_path / "store", "m", "1.0", store.base_sha256, store.base_weights)
    assert again.head()[0] == 1


def _append_many(root: str, base: str, sha: str, count: int) -> None:
    store = RevisionStore(root, "m", "1.0", sha, base, retention=100)
    for _ in range(count):
        with store.locked():
            head, _ = store.head()
            store.append("step", parent=head, step=head + 1, weights={"w": torch.full((3,), float(head))})


def test_concurrent_writers_in_separate_processes_never_lose_a_revision(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_append_many, args=(str(tmp_path / "store"), str(store.base_weights), store.base_sha256, 5)
        )
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    revisions = store.revisions()
    assert [r.revision for r in revisions] == list(range(16))
    # each step's parent is the revision before it: the lock made every read-modify-write whole
    assert [r.parent for r in revisions[1:]] == list(range(15))


def test_the_file_store_is_the_interface_the_worker_uses(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert RevisionStore is FileRevisionStore and isinstance(store, AbstractRevisionStore)
    with pytest.raises(TypeError, match="abstract"):
        AbstractRevisionStore()  # type: ignore[abstract]


def test_a_commit_on_a_stale_parent_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    """Two handles on one directory, as two replicas on a shared volume: the second, still at the base,
    cannot commit a second child of revision 0 (it would fork the history)."""
    store = make_store(tmp_path)
    other = RevisionStore(tmp_path / "store", "m", "1.0", store.base_sha256, store.base_weights)
    with store.locked():
        store.append("step", parent=0, step=1, weights={"w": torch.ones(3)}, request_id="r1", result={"x": 1})
    before = sorted((p.name, p.read_bytes()) for p in store.directory.iterdir())
    with other.locked(), pytest.raises(ConflictError, match="head is 1, not the parent 0"):
        other.append("step", parent=0, step=1, weights={"w": torch.full((3,), 9.0)})
    assert sorted((p.name, p.read_bytes()) for p in store.directory.iterdir()) == before
    # what one handle committed, the other reads at once (HEAD and the manifest are read on every call)
    assert other.head() == store.head() and other.head()[0] == 1
    found = other.find_request("r1")
    assert found is not None and found.revision == 1
