"""`gateway shadow start|stop|clear|status`: the operators' runtime overrides of a route's `[shadow]`, over the
admin API (`client.admin`), audited like kill switches; the policy files stay untouched (`shadow.overrides`).

- `start ROUTE VARIANT [--share P] --reason R`: copy P % of the route's requests to VARIANT (default: the policy's
  share when its `[shadow]` names VARIANT, else 100), in place of what the policy declares.
- `stop ROUTE VARIANT --reason R`: no copies for the route; VARIANT must name the shadow in force.
- `clear ROUTE --reason R`: the policy's `[shadow]` (or none) applies again.
- `status ROUTE`: the shadow in force, the policy's, the override (flagged when stale) and the copies compared.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from gateway.cli.client import admin, admin_args, show


def add_commands(sub: Any) -> None:
    shadow = sub.add_parser(
        "shadow", help="a route's shadow copies: start, stop, clear (runtime, audited), status"
    )
    verbs = shadow.add_subparsers(required=True, metavar="VERB")
    start = verbs.add_parser("start", help="copy a share of ROUTE's requests to VARIANT until cleared")
    start.add_argument("route")
    start.add_argument("variant")
    start.add_argument(
        "--share", type=float, help="percent, in (0, 100] (default: the policy's for VARIANT, else 100)"
    )
    stop = verbs.add_parser("stop", help="no copies for ROUTE until cleared (VARIANT: the shadow in force)")
    stop.add_argument("route")
    stop.add_argument("variant")
    clear = verbs.add_parser(
        "clear", help="drop ROUTE's override: its policy's [shadow], or none, applies again"
    )
    clear.add_argument("route")
    for verb, name in ((start, "start"), (stop, "stop"), (clear, "clear")):
        verb.add_argument("--reason", required=True)
        admin_args(verb)
        verb.set_defaults(func=cmd_override, verb=name)
    status = verbs.add_parser("status", help="ROUTE's shadow: in force, declared, overridden, compared")
    status.add_argument("route")
    admin_args(status)
    status.set_defaults(func=cmd_status)


def cmd_override(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"reason": args.reason}
    if args.verb != "clear":
        body["variant"] = args.variant
    if args.verb == "start" and args.share is not None:
        body["share"] = args.share
    answer = admin(args, "POST", f"/admin/shadow/{args.route}/{args.verb}", json=body)
    return show(args, answer, _print_changed)


def cmd_status(args: argparse.Namespace) -> int:
    return show(args, admin(args, "GET", f"/admin/shadow/{args.route}"), _print_status)


def _print_changed(body: dict[str, Any]) -> None:
    print(f"{body['action']}: done")
    _print_state(body)


def _print_status(body: dict[str, Any]) -> None:
    _print_state(body)
    print(f"  copies in flight here: {body['in_flight']}")
    for s in body["summaries"]:
        drops = sum(s["drops"].values())
        print(
            f"  {s['variant']}: {s['pairs']} pairs, {s['copies']} copies, {drops} dropped (gateway report --shadow)"
        )


def _print_state(body: dict[str, Any]) -> None:
    print(f"{body['route']}: {_spec(body['shadow'])}")
    print(f"  policy: {_spec(body['declared'])}")
    o = body["override"]
    if o is None:
        print("  override: none")
        return
    share = "" if o["share"] is None else f" {o['share']:g}%"
    print(f"  override: {o['mode']} {o['variant']}{share} by {o['actor']} at {_when(o['at'])}: {o['reason']}")
    if o["stale"]:
        print(f"  STALE, not applied: {o['problem']}")


def _spec(spec: dict[str, Any] | None) -> str:
    if spec is None:
        return "no shadow"
    budget = spec["max_cost_per_hour"]
    return (
        f"copies {spec['share']:g}% to {spec['variant']} (max_in_flight {spec['max_in_flight']}, "
        f"budget {'none' if budget is None else f'{budget:g}/h'}, stream {spec['stream']})"
    )


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
