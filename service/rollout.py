"""Rolling a store version out to every replica, and back: raee-admin rollout and rollback.

    1 ask every replica what it serves for the task (none answering: an error, nothing changed)
    2 reload each replica to the version (ReloadStore naming it)
    3 check that every replica now reports it
    4 switch the store's CURRENT to it, so that new and restarted replicas load it too
On any refusal in 2 or 3, the replicas already moved are reloaded back to the version each served before, and
CURRENT is left alone: every replica, old or new, keeps serving one version.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raee.errors import InputError, RaeeError
from raee.versions import current_version, latest_version, previous_version, switch_current, version_path
from service.client import Client, RaeeClientError


class NoReplica(RaeeError):
    """No replica answered: nothing was changed."""


@dataclass
class Replica:
    address: str
    client: Client
    serving: str = ""  # version before the rollout
    store_path: str = ""  # the task's store version directory, as the replica sees it


def say(line: str) -> None:
    print(line, flush=True)


def rollout(task: str, version: str | None, addresses: list[str], store: str | None,
            connect: Callable[[str], Client], rollback: bool = False) -> int:
    """Move every replica (and then CURRENT) to `version` (rollback: to the version before CURRENT); 0 when done,
    1 when a replica refused and all were put back. NoReplica or StoreError before anything changed."""
    replicas = [Replica(a, connect(a)) for a in addresses]
    try:
        silent = []
        for r in replicas:
            try:
                info = r.client.info()
            except RaeeClientError as exc:
                silent.append(f"{r.address} ({exc.code.name})")
                continue
            served = {t.name: t for t in info.tasks}
            if task not in served:
                raise NoReplica(f"{r.address} does not serve task {task} (it serves {', '.join(served) or 'none'})")
            r.serving, r.store_path = served[task].store_version, served[task].store_path
        if len(silent) == len(replicas):
            raise NoReplica(f"no replica answers: {', '.join(silent)}; check --address and that the servers run")
        if silent:
            raise NoReplica(f"not every replica answers ({', '.join(silent)}); nothing was changed")
        root = store or str(Path(replicas[0].store_path).parent)
        if rollback:
            version = previous_version(root)
        elif version == "latest":
            version = latest_version(root)
        elif version is None:
            raise InputError("a rollout needs a version (a version directory's name, or latest)")
        version_path(root, version)  # a complete version of this store, or StoreError now
        say(f"{'rollback' if rollback else 'rollout'} of task {task} to {version} (store {root}, CURRENT "
            f"{current_version(root)}) on {len(replicas)} replicas")
        moved: list[Replica] = []
        for r in replicas:
            try:
                result = r.client.reload(task, root, version)
            except RaeeClientError as exc:
                say(f"{r.address}: refused: {exc}")
                put_back(task, root, moved)
                say(f"CURRENT left at {current_version(root)}")
                return 1
            moved.append(r)
            say(f"{r.address}: {result.previous_version} -> {result.store_version}")
        wrong = []
        for r in replicas:
            try:
                reported = next(t.store_version for t in r.client.info().tasks if t.name == task)
            except (RaeeClientError, StopIteration) as exc:
                reported = f"no answer ({exc})"
            if reported != version:
                wrong.append(f"{r.address} reports {reported}")
        if wrong:
            say(f"not every replica serves {version}: {'; '.join(wrong)}")
            put_back(task, root, moved)
            say(f"CURRENT left at {current_version(root)}")
            return 1
        before = switch_current(root, version)
        say(f"every replica serves {version}; CURRENT {before} -> {version}")
        return 0
    finally:
        for r in replicas:
            r.client.close()


def put_back(task: str, root: str, moved: list[Replica]) -> None:
    """Reload the replicas already moved to the version each served before."""
    for r in reversed(moved):
        try:
            back = r.client.reload(task, root, r.serving)
            say(f"{r.address}: put back {back.previous_version} -> {back.store_version}")
        except RaeeClientError as exc:
            print(f"{r.address}: cannot put back {r.serving}: {exc}", file=sys.stderr, flush=True)
