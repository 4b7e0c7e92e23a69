"""The `gateway` command: `main`, the argument parser and the dispatch to a command; the commands live in one
module per group: `run` (serve, demo, engine, sim-engine), `admin` (the commands that call the admin API),
`report`, `loadtest`, `canary` (canary, drill) and `shadow` (shadow start, stop, clear, status). A command that
fails raises `CommandError` (`client`, shared by every group), which `main` prints once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from gateway.cli import admin, canary, loadtest, report, run, shadow
from gateway.cli.client import CommandError
from gateway.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except CommandError as err:  # the one place a command's failure is printed
        print(f"{err.command}: {err.message}", file=sys.stderr)
        return err.status


def _run(args: argparse.Namespace) -> int:
    """The command; a configuration it cannot use (a setting, a policy, keys or scenario file) is a
    `CommandError` (2)."""
    try:
        result: int = args.func(args)
    except ConfigError as err:
        raise CommandError(f"configuration rejected: {err.message}", status=2) from None
    except ValidationError as err:
        if err.title != "Settings":  # other files' models are turned into ConfigError where they are read
            raise
        raise CommandError(f"configuration rejected: {_settings_problems(err)}", status=2) from None
    return result


def _settings_problems(err: ValidationError) -> str:
    """Each bad setting by its variable, with pydantic's message (`GATEWAY_ENGINES: engine 'x': ...`)."""
    problems = []
    for e in err.errors():
        name = str(e["loc"][0]) if e["loc"] else "?"
        variable = name if name.isupper() else f"GATEWAY_{name.upper()}"  # OTEL_* come by their own names
        problems.append(f"{variable}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def _parser() -> argparse.ArgumentParser:
    """Every command; `gateway --help` lists them in the order they are added here."""
    p = argparse.ArgumentParser(prog="gateway", description="Canary gateway for fine-tuned model variants.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    run.add_commands(sub)
    admin.add_commands(sub)
    report.add_commands(sub)
    admin.add_adapter_commands(sub)
    loadtest.add_parser(sub)
    canary.add_commands(sub)
    shadow.add_commands(sub)
    keys = sub.add_parser("hash-key", help="print the sha256 line for a keys file entry")
    keys.add_argument("token")
    keys.set_defaults(func=cmd_hash_key)
    return p


def cmd_hash_key(args: argparse.Namespace) -> int:
    from gateway.keys import digest_of

    print(f'sha256 = "{digest_of(args.token)}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
