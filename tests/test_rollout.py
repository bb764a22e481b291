"""The rebuild-and-rollout flow end to end, with three local raee-serve processes standing in for replicas and a
client classifying against all of them throughout: build --like (two shards), merge without switching CURRENT,
a rollout that one replica refuses (every replica back on the old version, CURRENT unchanged), a rollout every
replica accepts, and a rollback; not one Classify call fails."""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from pathlib import Path

import pytest

from indexer.cli import main as raee_index
from raee.versions import current_version
from service.admin import main as raee_admin
from service.client import Client, RaeeClientError
from service.launch import ServerProcess, free_port
from tests.waiting import wait_until

pytestmark = pytest.mark.slow  # real raee-serve processes: tens of seconds

TOKEN = "rollout-test-token-0123456789"


class Traffic:
    """Classify on every replica in turn until stopped; counts failures and the versions that answered."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses, self.failures, self.versions, self.calls = addresses, [], set(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        clients = [Client(a, timeout=30, retries=0) for a in self.addresses]
        for client in itertools.cycle(clients):
            if self._stop.is_set():
                break
            try:
                self.versions.add(client.classify(["good film"], task="sst2").store_version)
                self.calls += 1
            except RaeeClientError as exc:
                self.failures.append(f"{client.address}: {exc}")
            time.sleep(0.01)
        for client in clients:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def serving(address: str) -> str:
    with Client(address) as client:
        return client.info().tasks[0].store_version


def test_build_like_merge_rollout_refused_rollout_rollback(stores, sst2_like, tmp_path, capsys):
    root = tmp_path / "stores"
    store = root / "sst2"
    shutil.copytree(stores["current"], store)
    old = current_version(store)
    parts = [str(tmp_path / f"part{i}") for i in range(2)]
    for i, part in enumerate(parts):  # the rebuild Job: settings taken from the store that serves
        assert raee_index(["build", "--like", str(store), "--train", str(sst2_like), "--limit", "100", "--out", part,
                           "--shard", f"{i}/2", "--no-progress"]) == 0
    assert raee_index(["merge", str(store), *parts, "--no-promote"]) == 0
    new = capsys.readouterr().out.split("merged 2 shards into ")[1].split(":")[0].rsplit("/", 1)[1]
    assert new != old and current_version(store) == old  # written, not switched

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    replicas = [ServerProcess([str(store)], admin=True, roots=(str(root),)) for _ in range(2)]
    # the third replica wants the admin token: a rollout without it is refused there
    replicas.append(ServerProcess([str(store)], "--admin-token-file", str(token_file), admin=True,
                                  roots=(str(root),)))
    try:
        assert all(r.wait_serving() for r in replicas), [r.output()[-2000:] for r in replicas]
        admins = [arg for r in replicas for arg in ("--address", r.admin_address)]
        traffic = Traffic([r.address for r in replicas])
        time.sleep(0.3)

        assert raee_admin(["rollout", "--task", "sst2", "--version", new, *admins]) == 1
        out = capsys.readouterr().out
        assert "refused: UNAUTHENTICATED" in out and out.count("put back") == 2
        assert [serving(r.address) for r in replicas] == [old] * 3 and current_version(store) == old

        assert raee_admin(["--token-file", str(token_file), "rollout", "--task", "sst2", "--version", new,
                           *admins]) == 0
        assert f"every replica serves {new}; CURRENT {old} -> {new}" in capsys.readouterr().out
        assert [serving(r.address) for r in replicas] == [new] * 3 and current_version(store) == new
        # traffic answered by the new version before the rollback: a fixed window (three info calls) may be too short
        wait_until(lambda: new in traffic.versions, timeout=30)

        assert raee_admin(["--token-file", str(token_file), "rollback", "--task", "sst2", *admins]) == 0
        assert f"CURRENT {new} -> {old}" in capsys.readouterr().out
        assert [serving(r.address) for r in replicas] == [old] * 3 and current_version(store) == old
        mark = traffic.calls  # calls after the rollback too, and enough calls overall, however slow
        wait_until(lambda: traffic.calls > max(20, mark), timeout=30)
        traffic.stop()
        assert traffic.failures == [] and traffic.calls > 20 and traffic.versions == {old, new}
    finally:
        for r in replicas:
            r.stop()


def test_no_replica_answering_is_one_line_and_exit_2(capsys):
    addresses = [arg for _ in range(2) for arg in ("--address", f"127.0.0.1:{free_port()}")]
    assert raee_admin(["--timeout", "1", "rollout", "--task", "sst2", "--version", "v1", *addresses]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("raee-admin rollout: error: no replica answers")


def test_build_like_refuses_flags_it_takes_from_the_store(stores, sst2_like, tmp_path, capsys):
    assert raee_index(["build", "--like", stores["current"], "--train", str(sst2_like), "--out", str(tmp_path / "s"),
                       "--key", "prefix:1", "--objective", "raee"]) == 2
    assert "--like takes --key, --objective from" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_build_like_copies_the_serving_settings(stores, sst2_like, tmp_path):
    from raee.store import load_store
    out = tmp_path / "like"
    assert raee_index(["build", "--like", stores["current"], "--train", str(sst2_like), "--limit", "80", "--out",
                       str(out), "--no-progress"]) == 0
    built, like = load_store(out).manifest, load_store(stores["current"]).manifest
    for field in ("task", "key", "index", "policy", "calibration_settings"):
        assert getattr(built, field) == getattr(like, field), field
    for field in ("source", "kind", "fingerprint", "dtype", "runtime", "precision", "settings"):
        assert getattr(built.backbone, field) == getattr(like.backbone, field), field
    assert Path(out, "CURRENT").is_file()  # a first version is current even with --no-promote


def test_switching_current_names_only_complete_versions(stores, tmp_path):
    from raee.errors import StoreError
    from raee.versions import latest_version, previous_version, switch_current
    store = tmp_path / "sst2"
    shutil.copytree(stores["current"], store)
    only = current_version(store)
    assert latest_version(store) == only
    with pytest.raises(StoreError, match="no earlier version"):
        previous_version(store)
    with pytest.raises(StoreError, match="has no complete version v20990101T000000000000Z"):
        switch_current(store, "v20990101T000000000000Z")
    with pytest.raises(StoreError, match="is not a version name"):
        switch_current(store, "../other")
    assert current_version(store) == only
