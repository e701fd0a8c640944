"""``spinenode web`` (the results API and page alone) and ``spinenode tokens`` (who may use
them)."""

from __future__ import annotations

import argparse
import json

from dicom_node.cli.common import (
    Fatal,
    add_settings_flags,
    announce,
    configure_logging,
    prepare_database,
    settings_from,
    stop_on_signal,
)
from dicom_node.config import Settings


def start_http(settings: Settings, sessions, queue, registry):  # noqa: ANN001, ANN201
    """The HTTP server for ``serve`` and ``web``, listening, or None when http_port is 0."""
    if settings.http_port == 0:
        return None
    from dicom_node.web.app import HttpServer, create_app

    server = HttpServer(settings, create_app(settings, sessions, queue, registry))
    try:
        server.start()
    except OSError as error:
        raise Fatal(f"HTTP: {error}") from None
    return server


def cmd_web(args: argparse.Namespace) -> int:
    from dicom_node.db.session import session_factory
    from dicom_node.metrics import node_registry
    from workers.tasks import TaskQueue

    settings = settings_from(args)
    if settings.http_port == 0:
        raise Fatal("SPINENODE_HTTP_PORT is 0: nothing to serve")
    configure_logging(settings)
    prepare_database(settings, upgrade_if_sqlite=False)
    sessions = session_factory(settings.effective_database_url)
    queue = TaskQueue(settings)
    stop = stop_on_signal()
    server = start_http(settings, sessions, queue, node_registry(sessions, queue.depth))
    announce(settings, f"spinenode web: results API and page on {server.url}")
    stop.wait()
    server.stop()
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from dicom_node.db.session import session_factory
    from dicom_node.tokens import TokenError, create_token, list_tokens, revoke_token

    settings = settings_from(args)
    settings.make_dirs()
    prepare_database(settings, upgrade_if_sqlite=True)
    sessions = session_factory(settings.effective_database_url)
    try:
        if args.tokens_command == "create":
            secret = create_token(sessions, args.name, args.role)
            print(secret)  # alone on stdout: `TOKEN=$(spinenode tokens create ...)` works
            return 0
        if args.tokens_command == "revoke":
            revoke_token(sessions, args.name)
            print(f"token {args.name!r} revoked")
            return 0
    except TokenError as error:
        raise Fatal(str(error)) from None
    rows = list_tokens(sessions)
    if args.json:
        print(json.dumps(rows, indent=1))
    for row in [] if args.json else rows:
        state = "revoked" if row["revoked"] else f"last used {row['last_used_at'] or 'never'}"
        print(f"{row['name']:24} {row['role']:8} created {row['created_at']}  {state}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """The compose file's healthcheck (no curl in the image): the node's /health/live or
    /health/ready answers 200, or (--worker) a worker on this host beat lately."""
    import socket
    import urllib.error
    import urllib.request

    settings = settings_from(args)
    if args.worker:
        from dicom_node.db.session import session_factory
        from dicom_node.heartbeat import heartbeats

        host = socket.gethostname()
        beats = [b for b in heartbeats(session_factory(settings.effective_database_url))
                 if b["name"].endswith(f"@{host}")
                 and b["age_seconds"] <= settings.worker_heartbeat_max_age_seconds]
        if not beats:
            raise Fatal(f"no worker on {host} beat in the last "
                        f"{settings.worker_heartbeat_max_age_seconds:.0f} s")
        print(f"worker {beats[0]['name']}: beat {beats[0]['age_seconds']} s ago")
        return 0
    base = args.url or f"http://127.0.0.1:{settings.http_port}"
    url = f"{base.rstrip('/')}/health/{'ready' if args.ready else 'live'}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as error:
        print(error.read().decode())
        return 1
    except OSError as error:
        raise Fatal(f"{url}: {error}") from None


def add_commands(commands: argparse._SubParsersAction) -> None:
    """web, tokens, health"""
    health = commands.add_parser("health", help="check /health/live (or --ready) of a node, "
                                                "or that this host's worker beats (--worker)")
    add_settings_flags(health)
    health.add_argument("--url", help="the node's HTTP address (default http://127.0.0.1:PORT)")
    health.add_argument("--ready", action="store_true", help="readiness instead of liveness")
    health.add_argument("--worker", action="store_true",
                        help="a worker process on this host wrote a heartbeat lately")
    health.set_defaults(handler=cmd_health)

    web = commands.add_parser("web", help="serve the results API, page, health and metrics "
                                          "alone (serve runs them too)")
    add_settings_flags(web)
    web.add_argument("--http-port", type=int, help="port (default 8080)")
    web.set_defaults(handler=cmd_web)

    tokens = commands.add_parser("tokens", help="API tokens: create, list, revoke")
    add_settings_flags(tokens)
    token_commands = tokens.add_subparsers(dest="tokens_command", required=True)
    create = token_commands.add_parser("create", help="make a token; its secret is printed once")
    create.add_argument("name")
    create.add_argument("--role", choices=("viewer", "operator"), default="viewer",
                        help="viewer reads; operator also retries and re-queues (default viewer)")
    listing = token_commands.add_parser("list", help="tokens with role and last use")
    listing.add_argument("--json", action="store_true")
    revoke = token_commands.add_parser("revoke", help="a token stops working at once")
    revoke.add_argument("name")
    tokens.set_defaults(handler=cmd_tokens, json=False)
