"""`gateway report`: per route and variant figures, the shadow comparisons and the canaries' steps, from the
request log and the state database. It reads them directly (the SQLite files, or Postgres with GATEWAY_DATABASE_URL), not the admin API, so
it also works while the gateway is down.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.client import CommandError, parse_since
from gateway.errors import ConfigError
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.policy import Route
    from gateway.store.request_log import Where


def add_commands(sub: Any) -> None:
    report = sub.add_parser("report", help="per route and variant figures from the request log")
    report.add_argument("--route")
    report.add_argument("--since", help="ISO time or a duration such as 2h, 30m, 7d")
    report.add_argument("--until", help="ISO time (exclusive), e.g. the end of a load test's window")
    report.add_argument("--json", action="store_true")
    report.add_argument(
        "--shadow", action="store_true", help="only the shadow comparisons (with --json: as JSON)"
    )
    report.add_argument(
        "--db",
        type=Path,
        help="a request log file (default: GATEWAY_DATABASE_URL's database, else $GATEWAY_DATA_DIR/requests.db)",
    )
    report.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from gateway import report
    from gateway.shadow import pairs
    from gateway.store.request_log import read_records

    settings = Settings()
    db: Where = args.db or (
        settings.database_url.get_secret_value() if settings.database_url else settings.records_db
    )
    if isinstance(db, Path) and not db.exists():
        raise CommandError(f"no request log at {db}")
    since = parse_since(args.since) if args.since else None
    until = parse_since(args.until) if args.until else None
    records = read_records(db, route=args.route, since=since, until=until)
    shadows = pairs.summarize(records)
    if args.shadow and args.json:
        sys.stdout.buffer.write(pairs.to_json(shadows) + b"\n")
    elif args.shadow:
        print(pairs.format_text(shadows) or "no shadow copies in the request log")
    elif args.json:
        sys.stdout.buffer.write(report.to_json(report.summarize(records)) + b"\n")
    else:
        print(report.format_table(report.summarize(records)))
        if shadows:
            print(pairs.format_text(shadows))
        _print_canaries(db, _state_where(args.db, settings), args.route, since)
    return 0


def _state_where(db: Path | None, settings: Settings) -> Where:
    """The state store beside the request log read: `--db`'s directory, else the gateway's own."""
    if db is not None:
        return db.parent / "state.db"
    return settings.database_url.get_secret_value() if settings.database_url else settings.state_db


def _print_canaries(records_db: Where, state_db: Where, route: str | None, since: float | None) -> None:
    from gateway.canary import report as canary_report
    from gateway.canary.machine import ACTIVE

    entries = canary_report.read_entries(state_db, route, since)
    states = canary_report.read_states(state_db)
    if any(state.status in ACTIVE for state in states.values()):
        try:  # the steps in progress need the canaries' specs: the policies this machine has
            routes = _policy_routes()
        except ConfigError as err:
            print(f"(the canaries' steps in progress are not shown: {err.message})", file=sys.stderr)
        else:
            wanted = {n: r for n, r in routes.items() if route is None or n == route}
            entries += canary_report.running_entries(wanted, states, records_db, time.time())
    table = canary_report.format_table(entries)
    if table:
        print(table)


def _policy_routes() -> dict[str, Route]:
    from gateway.control.adapters import scan
    from gateway.control.policies import load_configured

    settings = Settings()
    return dict(load_configured(settings, scan(settings.adapters_dir)).routes)
