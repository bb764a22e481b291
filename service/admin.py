"""raee-admin: talk to a running raee-serve from the shell (info, classify, reload, wait)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from service.client import Client, RaeeClientError
from service.config import DEFAULT_PORT


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raee-admin", description=__doc__)
    address = f"localhost:{DEFAULT_PORT}"
    p.add_argument("--address", default=address, help=f"server host:port ({address})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (30)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the server's admin token, sent with reload (default: $RAEE_ADMIN_TOKEN)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backbone, tasks with store versions, limits (JSON)")
    c = sub.add_parser("classify", help="classify texts and print label, exit layer and latency")
    c.add_argument("--task", required=True)
    c.add_argument("--policy", default="calibrated",
                   help="calibrated (the store's calibrated policy, the default), raee, full or static:L")
    c.add_argument("texts", nargs="+")
    r = sub.add_parser("reload", help="swap in a new store version for a task")
    r.add_argument("--task", required=True)
    r.add_argument("--store", required=True, metavar="DIR", help="store directory as the server sees it")
    r.add_argument("--every-address", action="store_true",
                   help="reload every address the host name resolves to (a headless Service: every replica)")
    w = sub.add_parser("wait", help="block until the server's health is SERVING")
    w.add_argument("--for", dest="wait_for", type=float, default=120.0, metavar="SECONDS")
    return p


def every_address(address: str) -> list[str]:
    import socket
    host, _, port = address.rpartition(":")
    found = sorted({info[4][0] for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)})
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in found]


def admin_token(args: argparse.Namespace) -> str | None:
    """The admin token from --token-file, else $RAEE_ADMIN_TOKEN, else none."""
    if args.token_file:
        return Path(args.token_file).read_text(encoding="utf-8").strip()
    return os.environ.get("RAEE_ADMIN_TOKEN") or None


def reload_everywhere(args: argparse.Namespace, token: str | None) -> int:
    failed = 0
    for address in every_address(args.address):
        with Client(address, timeout=args.timeout, token=token) as client:
            try:
                r = client.reload(args.task, args.store)
                print(f"{address} {r.task}: {r.previous_version} -> {r.store_version}")
            except RaeeClientError as exc:
                print(f"{address}: {exc}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        token = admin_token(args)
    except OSError as exc:
        print(f"raee-admin: error: --token-file {args.token_file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.command == "reload" and args.every_address:
        return reload_everywhere(args, token)
    with Client(args.address, timeout=args.timeout, token=token) as client:
        try:
            if args.command == "info":
                info = client.info()
                print(json.dumps({"backbone": info.backbone, "limits": info.limits, "version": info.version,
                                  "tasks": [{"name": t.name, "labels": t.labels, "store_version": t.store_version,
                                             "store_path": t.store_path} for t in info.tasks]}, indent=2))
            elif args.command == "classify":
                result = client.classify(args.texts, task=args.task, policy=args.policy)
                for text, r in zip(args.texts, result.results):
                    gate = f" (off-domain: {r.off_domain})" if r.off_domain else ""
                    print(f"{r.label}\texit {r.exit_layer}/{r.num_layers}{gate}\t{text}")
                print(f"{result.timings.total_ms:.1f} ms, store {result.store_version}")
            elif args.command == "reload":
                r = client.reload(args.task, args.store)
                print(f"{r.task}: {r.previous_version} -> {r.store_version}")
            else:
                client.wait_until_serving(args.wait_for)
                print("SERVING")
        except (RaeeClientError, TimeoutError) as exc:
            print(f"raee-admin {args.command}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
