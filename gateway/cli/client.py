"""What every `gateway` command shares: the one error type, `CommandError`, which commands raise and
`gateway.cli.main.main` prints once (`gateway: message`, exit status 1 unless the error says otherwise); the one
client of the admin API (`admin`, with the flags it reads: `admin_args`), which turns an unreachable gateway or an
error answer into a `CommandError` carrying the answer's message; `show`, which prints an answer as raw JSON with
`--json`, else as the command's text; and `parse_since` for `--since`/`--until`. Command modules (`run`, `admin`,
`report`, `canary`, `shadow`, `loadtest`) import this module and never each other.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import orjson

from gateway.settings import Settings


class CommandError(Exception):
    """A command failed for a reason its user can act on; `main` prints `<command>: <message>` on stderr and
    exits with `status` (2: the configuration was rejected)."""

    def __init__(self, message: str, *, status: int = 1, command: str = "gateway") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.command = command


def admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="gateway base URL (default: from GATEWAY_HOST/GATEWAY_PORT)")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p.add_argument("--actor", help="who the audit log names (default: $USER, else the login name)")


def admin(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    """Call the admin API (`--url`, else the configured address) with `GATEWAY_ADMIN_TOKEN`; the answer's JSON."""
    settings = Settings()
    if settings.admin_token is None:
        raise CommandError("GATEWAY_ADMIN_TOKEN is not set")
    url = (args.url or settings.admin_url).rstrip("/")
    headers = {
        "Authorization": f"Bearer {settings.admin_token.get_secret_value()}",
        "X-Gateway-Actor": actor_name(args.actor, os.environ),
    }
    try:
        response = httpx.request(method, url + path, headers=headers, timeout=10.0, **kwargs)
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach the gateway at {url}: {exc}") from None
    body = response.json() if response.content else {}
    if response.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise CommandError(f"{response.status_code}: {error.get('message', response.text)}")
    return body


def actor_name(
    flag: str | None, environ: Mapping[str, str], login: Callable[[], str | None] | None = None
) -> str:
    """Who the audit log names for a command: `--actor`, else $USER, else $LOGNAME, else the login name of the
    process's user (cron jobs, containers and `env -i` have no USER), else `cli`."""
    named = flag or environ.get("USER") or environ.get("LOGNAME")
    return named or (login or _login_name)() or "cli"


def _login_name() -> str | None:
    try:
        import pwd
    except ImportError:  # not on POSIX
        return None
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a user id without a passwd entry (some containers)
        return None


def show(args: argparse.Namespace, body: Any, text: Callable[[Any], None]) -> int:
    """Print an answer: as indented JSON with `--json`, else `text(body)` for a terminal; the exit status, 0."""
    if args.json:
        print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    else:
        text(body)
    return 0


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(text: str, now: float | None = None) -> float:
    """'2h', '30m', '7d', '45s' back from now, or an ISO 8601 time (UTC when it has no offset)."""
    match = _DURATION.match(text.strip())
    if match:
        seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return (time.time() if now is None else now) - seconds
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(f"--since: {text!r} is neither a duration (2h, 30m) nor an ISO time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()
