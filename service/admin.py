"""raee-admin: talk to running raee-serve replicas from the shell (info, classify, reload, wait, rollout,
rollback)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

from raee.errors import InputError, RaeeError
from raee.exit_policy import CALIBRATED
from raee.versions import read_limited
from service.client import Client, RaeeClientError
from service.config import DEFAULT_PORT, SETTING_FILE_BYTES
from service.policy_wire import to_wire


def seconds(text: str) -> float:
    """A command-line number of seconds: finite and above 0 (argparse's one-line error and exit 2 otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value


def address(text: str) -> str:
    """A command-line server address, HOST:PORT with a port in 1..65535 (gRPC would take 99999 as 34463)."""
    host, _, port = text.rpartition(":")
    if not (host and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise argparse.ArgumentTypeError(f"{text[:200]!r} is not HOST:PORT with a port in 1..65535")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raee-admin", description=__doc__)
    default = f"localhost:{DEFAULT_PORT}"
    p.add_argument("--address", type=address, default=default, help=f"server host:port ({default})")
    p.add_argument("--timeout", type=seconds, default=30.0, help="seconds per call (30)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the server's admin token, sent with reload (default: $RAEE_ADMIN_TOKEN)")
    t = p.add_argument_group("TLS", "for a server with tls_cert: without --tls-ca raee-admin speaks plaintext, "
                                    "which a TLS server cannot answer")
    t.add_argument("--tls-ca", default=None, metavar="PEM", help="CA certificates that signed the server's "
                   "certificate; turns TLS on")
    t.add_argument("--tls-cert", default=None, metavar="PEM", help="this client's certificate, for a server that "
                   "asks for one (tls_client_ca: mutual TLS)")
    t.add_argument("--tls-key", default=None, metavar="PEM", help="this client's private key, with --tls-cert")
    t.add_argument("--tls-server-name", default=None, metavar="NAME",
                   help="the name the server's certificate carries, where --address uses another (an IP)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backbone, tasks with store versions, limits (JSON)")
    c = sub.add_parser("classify", help="classify texts and print label, exit layer and latency")
    c.add_argument("--task", required=True)
    c.add_argument("--policy", default=str(CALIBRATED),
                   help="calibrated (the store's calibrated policy, the default), raee, full or static:L")
    c.add_argument("--truncate", action="store_true",
                   help="cut texts past the backbone's token limit to fit instead of having them refused")
    c.add_argument("texts", nargs="+")
    r = sub.add_parser("reload", help="swap in a new store version for a task")
    r.add_argument("--task", required=True)
    r.add_argument("--store", required=True, metavar="DIR", help="store directory as the server sees it")
    r.add_argument("--every-address", action="store_true",
                   help="reload every address the host name resolves to (a headless Service: every replica)")
    w = sub.add_parser("wait", help="block until the server's health is SERVING")
    w.add_argument("--for", dest="wait_for", type=seconds, default=120.0, metavar="SECONDS")
    for name, text in (("rollout", "reload every replica to a store version, check each serves it, then switch "
                                   "CURRENT; on any refusal put the replicas back and leave CURRENT alone"),
                       ("rollback", "the same, to the version that was CURRENT before the current one")):
        o = sub.add_parser(name, help=text, description=text + ". Exit 0 when done, 1 when a replica refused "
                           "(every replica back on its version), 2 when nothing could start (no replica answers).")
        o.add_argument("--task", required=True)
        if name == "rollout":
            o.add_argument("--version", required=True,
                           help="version directory name, e.g. v20261122T060746087729Z, or latest (the newest one)")
        o.add_argument("--address", dest="replicas", action="append", type=address, metavar="HOST:PORT",
                       help="a replica's admin address (repeat; default: --address before the command)")
        o.add_argument("--every-address", action="store_true",
                       help="every address the host name resolves to (a headless Service: every replica)")
        o.add_argument("--store", default=None, metavar="DIR",
                       help="the store directory, as this process and the replicas see it (default: the one the "
                            "first replica serves the task from)")
    return p


Connect = Callable[[str], Client]  # a replica's address -> a client for it


def connector(args: argparse.Namespace, token: str | None) -> Connect:
    """A function address -> Client with the command line's timeout, token and TLS settings. Certificate files are
    read here: OSError for one that cannot be read."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InputError("--tls-cert and --tls-key go together (a client certificate and its key)")
    if args.tls_cert and not args.tls_ca:
        raise InputError("--tls-cert needs --tls-ca (the CA of the server's certificate)")
    ca = read_limited(args.tls_ca, SETTING_FILE_BYTES) if args.tls_ca else None
    chain = read_limited(args.tls_cert, SETTING_FILE_BYTES) if args.tls_cert else None
    key = read_limited(args.tls_key, SETTING_FILE_BYTES) if args.tls_cert else None
    return lambda address: Client(address, timeout=args.timeout, token=token, root_certificates=ca,
                                  server_name=args.tls_server_name if ca else None, certificate_chain=chain,
                                  private_key=key)


def every_address(address: str) -> list[str]:
    import socket
    host, _, port = address.rpartition(":")
    try:
        found = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)})
    except socket.gaierror as exc:
        raise InputError(f"no replica answers: {host} does not resolve ({exc.strerror}); a headless Service has "
                         "no address while no pod is ready") from None
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in found]


def admin_token(args: argparse.Namespace) -> str | None:
    """The admin token from --token-file, else $RAEE_ADMIN_TOKEN, else none."""
    if args.token_file:
        return read_limited(args.token_file, SETTING_FILE_BYTES).decode("utf-8", "replace").strip()
    return os.environ.get("RAEE_ADMIN_TOKEN") or None


def reload_everywhere(args: argparse.Namespace, connect: Connect) -> int:
    failed = 0
    for address in every_address(args.address):
        with connect(address) as client:
            try:
                r = client.reload(args.task, args.store)
                print(f"{address} {r.task}: {r.previous_version} -> {r.store_version}")
            except RaeeClientError as exc:
                print(f"{address}: {exc}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


def roll(args: argparse.Namespace, connect: Connect) -> int:
    from service.rollout import rollout
    addresses = args.replicas or [args.address]
    if args.every_address:
        addresses = [a for address in addresses for a in every_address(address)]
    return rollout(args.task, getattr(args, "version", None), addresses, args.store, connect,
                   rollback=args.command == "rollback")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        token = admin_token(args)
    except OSError as exc:
        print(f"raee-admin: error: --token-file {args.token_file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        connect = connector(args, token)
        if args.command == "classify":
            try:
                to_wire(args.policy)  # a policy the server cannot be sent is the caller's mistake: before connecting
            except RaeeError as exc:
                raise InputError(f"--policy: {exc}") from None
        if args.command == "reload" and args.every_address:
            return reload_everywhere(args, connect)
        if args.command in ("rollout", "rollback"):
            return roll(args, connect)
    except (RaeeError, OSError) as exc:  # OSError: a certificate file, a host name that does not resolve
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"raee-admin {args.command}: error: {text}{where}", file=sys.stderr)
        return 2
    with connect(args.address) as client:
        try:
            if args.command == "info":
                info = client.info()
                print(json.dumps({"backbone": info.backbone, "limits": info.limits, "version": info.version,
                                  "tasks": [{"name": t.name, "labels": t.labels, "store_version": t.store_version,
                                             "store_path": t.store_path} for t in info.tasks]}, indent=2))
            elif args.command == "classify":
                result = client.classify(args.texts, task=args.task, policy=args.policy, truncate=args.truncate)
                for text, r in zip(args.texts, result.results):
                    gate = f" (off-domain: {r.off_domain})" if r.off_domain else ""
                    cut = " (cut to fit)" if r.truncated else ""
                    print(f"{r.label}\texit {r.exit_layer}/{r.num_layers}{gate}{cut}\t{text}")
                print(f"{result.timings.total_ms:.1f} ms, store {result.store_version}")
            elif args.command == "reload":
                reloaded = client.reload(args.task, args.store)
                print(f"{reloaded.task}: {reloaded.previous_version} -> {reloaded.store_version}")
            else:
                client.wait_until_serving(args.wait_for)
                print("SERVING")
        except (RaeeClientError, TimeoutError) as exc:
            print(f"raee-admin {args.command}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
