"""`gateway kill`, `revive`, `status`, `audit`, `reload`, `adapters list|swap|rollback` and `lineage`: the
commands that operate a running gateway through its admin API (`client.admin`, with `GATEWAY_ADMIN_TOKEN`), so
they work the same against a local or a remote gateway (`--url`), and print its answers for a terminal (or as
raw JSON with `--json`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections.abc import Mapping
from typing import Any

from gateway.cli.client import CommandError, admin, admin_args, parse_since, show


def add_commands(sub: Any) -> None:
    """The kill switches, the status, the audit trail and the policy reload."""
    for name, killed in (("kill", True), ("revive", False)):
        k = sub.add_parser(name, help=f"{name} a variant, a route, or everything (--all)")
        k.add_argument("route", nargs="?")
        k.add_argument("variant", nargs="?")
        k.add_argument("--all", action="store_true", help="every route")
        k.add_argument("--reason", required=True)
        k.add_argument("--force", action="store_true", help="even if it leaves a route with no live variant")
        admin_args(k)
        k.set_defaults(func=cmd_flip, killed=killed)

    status = sub.add_parser("status", help="routes, variants, weights, switches and live counters")
    admin_args(status)
    status.set_defaults(func=cmd_status)

    audit = sub.add_parser("audit", help="the audit trail, newest first")
    audit.add_argument("--route")
    audit.add_argument("--since", help="ISO time or a duration such as 2h, 30m, 7d")
    audit.add_argument("--limit", type=int, default=50)
    admin_args(audit)
    audit.set_defaults(func=cmd_audit)

    reload = sub.add_parser("reload", help="reload policies/ (the old policy stays if the new one is bad)")
    reload.add_argument("--reason")
    admin_args(reload)
    reload.set_defaults(func=cmd_reload)


def add_adapter_commands(sub: Any) -> None:
    """The adapter versions (list, swap, rollback) and a route's lineage."""
    adapters = sub.add_parser("adapters", help="adapter versions: list, swap, rollback")
    verbs = adapters.add_subparsers(required=True, metavar="VERB")
    listing = verbs.add_parser("list", help="every version with its lineage and what references it")
    admin_args(listing)
    listing.set_defaults(func=cmd_adapters_list)
    swap = verbs.add_parser("swap", help="serve another version on a variant (release-gated; loaded first)")
    swap.add_argument("route")
    swap.add_argument("variant")
    swap.add_argument("adapter", help="name@version")
    swap.add_argument("--reason", required=True)
    admin_args(swap)
    swap.set_defaults(func=cmd_adapters_swap)
    rollback = verbs.add_parser("rollback", help="serve the version the variant served before (never gated)")
    rollback.add_argument("route")
    rollback.add_argument("variant")
    rollback.add_argument("--reason", required=True)
    admin_args(rollback)
    rollback.set_defaults(func=cmd_adapters_rollback)

    lineage = sub.add_parser(
        "lineage", help="what served a route over a window, trained on what, changed by whom"
    )
    lineage.add_argument("route")
    lineage.add_argument("--since", help="ISO time or a duration such as 30d")
    lineage.add_argument("--until", help="ISO time")
    admin_args(lineage)
    lineage.set_defaults(func=cmd_lineage)


def cmd_flip(args: argparse.Namespace) -> int:
    verb = "kill" if args.killed else "revive"
    if args.all:
        path = f"/admin/{verb}-all"
    elif args.route and args.variant:
        path = f"/admin/routes/{args.route}/variants/{args.variant}/{verb}"
    elif args.route:
        path = f"/admin/routes/{args.route}/{verb}"
    else:
        raise CommandError(f"{verb}: name a ROUTE (and optionally a VARIANT), or pass --all")
    body = admin(args, "POST", path, json={"reason": args.reason, "force": args.force})
    return show(args, body, _print_flipped)


def _print_flipped(body: dict[str, Any]) -> None:
    print(f"{body['action']}: done")
    _print_routes(body["routes"])


def cmd_status(args: argparse.Namespace) -> int:
    return show(args, admin(args, "GET", "/admin/status"), _print_status)


def _print_status(body: dict[str, Any]) -> None:
    switches = body["switches"]
    print(f"policy {body['policy_version']}   kill-all: {'ON' if switches['global_kill'] else 'off'}")
    _print_routes(body["routes"])
    _print_shadow_overrides(body.get("shadow_overrides", []))
    _print_replicas(body.get("replicas", []), body.get("answered_by"))
    _print_engines(body.get("engines", {}))


def _print_shadow_overrides(overrides: list[dict[str, Any]]) -> None:
    """The operators' shadow overrides (`gateway shadow`); a stale one, not applied, says why."""
    if overrides:
        print("\nshadow overrides")
    for o in overrides:
        share = "" if o["share"] is None else f" {o['share']:g}%"
        stale = f"  STALE, not applied: {o['problem']}" if o["stale"] else ""
        print(f"  {o['route']}: {o['mode']} {o['variant']}{share} by {o['actor']}: {o['reason']}{stale}")


def _print_replicas(replicas: list[dict[str, Any]], answered_by: str | None) -> None:
    """Every live replica; one that serves another policy or other switches than most is marked."""
    print(f"\nreplicas ({len(replicas)} live)")
    print(f"  {'replica':<34} {'policy':<14} {'switches':<13} {'seen':>6}")
    now = time.time()
    for r in replicas:
        mark = "" if r["in_step"] else "  DIFFERS from the others"
        this = " (answered)" if r["id"] == answered_by else ""
        print(
            f"  {r['id']:<34} {r['policy_version']:<14} {r['switches']:<13} {now - r['last_seen']:>5.0f}s{mark}{this}"
        )


def _print_engines(engines: dict[str, list[dict[str, Any]]]) -> None:
    """Each pool's members: health (with the time left of an ejection), requests outstanding, adapters held."""
    if not engines:
        return
    print(f"\n{'engine':<12} {'member':<32} {'health':<16} {'outstanding':>11}  adapters")
    for name, members in engines.items():
        for m in members:
            health = m["health"] + (f" {m['ejected_for_s']:.0f}s" if m["health"] == "ejected" else "")
            adapters = ", ".join(m["adapters"]) or "-"
            print(f"{name:<12} {m['url']:<32} {health:<16} {m['outstanding']:>11}  {adapters}")


def _print_routes(routes: dict[str, Any]) -> None:
    for name, route in routes.items():
        state = "KILLED" if route["killed"] else ("no live variant" if not route["live"] else "live")
        print(
            f"\n{name}  [{state}]  tool_calls={route['tool_calls']}  fallback={','.join(route['fallback']) or '-'}"
        )
        print(f"  {'variant':<16} {'model':<24} {'weight':>7} {'share':>7} {'state':<7} {'requests':>9}")
        for vname, v in route["variants"].items():
            print(
                f"  {vname:<16} {v['model']:<24} {v['weight']:>7g} {v['effective_share']:>7.1%} "
                f"{'KILLED' if v['killed'] else 'live':<7} {v['requests'].get('total', 0):>9}"
            )


def cmd_audit(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.route:
        params["route"] = args.route
    if args.since:
        params["since"] = parse_since(args.since)
    return show(args, admin(args, "GET", "/admin/audit", params=params), _print_audit)


def _print_audit(body: dict[str, Any]) -> None:
    for e in body["entries"]:
        print(audit_line(e))


def audit_line(e: Mapping[str, Any]) -> str:
    """One audit entry for a terminal: when, who, what, on what (`audit_target`), why, under which policy."""
    policy = f"  [policy {e['policy_version']}]" if e.get("policy_version") else ""
    return (
        f"{_when(e['at'])}  {e['actor']:<12} {e['action']:<16} {audit_target(e):<28} {e.get('reason') or ''}"
        f"{policy}"
    ).rstrip()


def audit_target(e: Mapping[str, Any]) -> str:
    """What an audit entry acted on: `route/variant` (with the adapter version it now serves after a swap or a
    rollback), `name@version on engine E at URL` for a pool member's adapter loads, unloads and rejections, `all routes`
    for kill-all and revive-all, `policies` for a reload."""
    detail = e.get("detail") or {}
    where = "/".join(p for p in (e.get("route"), e.get("variant")) if p)
    if e["action"] in ("kill_all", "revive_all"):
        return "all routes"
    if e["action"].startswith("reload"):
        previous = detail.get("previous_version")
        return f"policies (was {previous})" if previous else "policies"
    adapter = detail.get("adapter")
    if adapter and "engine" in detail:
        member = f" at {detail['member']}" if detail.get("member") else ""
        return f"{adapter} on engine {detail['engine']}{member}"
    if adapter and where:
        return f"{where} -> {adapter}"
    return where or "-"


def cmd_reload(args: argparse.Namespace) -> int:
    body = admin(args, "POST", "/admin/reload", json={"reason": args.reason} if args.reason else {})
    return show(
        args,
        body,
        lambda b: print(
            f"policy {b['previous_version']} -> {b['policy_version']}; routes: {', '.join(b['routes'])}"
        ),
    )


def cmd_adapters_list(args: argparse.Namespace) -> int:
    return show(args, admin(args, "GET", "/admin/adapters"), _print_adapters)


def _print_adapters(body: dict[str, Any]) -> None:
    print(f"{'adapter':<24} {'invalid':>8} {'n':>5} {'approved by':<28} {'served by':<28} problem")
    for a in body["adapters"]:
        lineage = a["lineage"] or {}
        evaluation = lineage.get("evaluation") or {}
        rate = evaluation.get("invalid_call_rate")
        print(
            f"{a['ref']:<24} {'' if rate is None else f'{rate:.1%}':>8} {evaluation.get('n', ''):>5} "
            f"{','.join(lineage.get('approvers', [])) or '-':<28} {','.join(a['referenced_by']) or '-':<28} "
            f"{a['problem'] or ''}"
        )


def cmd_adapters_swap(args: argparse.Namespace) -> int:
    path = f"/admin/routes/{args.route}/variants/{args.variant}/adapter"
    body = admin(args, "POST", path, json={"adapter": args.adapter, "reason": args.reason})
    return show(
        args,
        body,
        lambda b: print(
            f"{args.route}/{args.variant}: {b['previous']} -> {b['adapter']} (policy {b['policy_version']})"
        ),
    )


def cmd_adapters_rollback(args: argparse.Namespace) -> int:
    path = f"/admin/routes/{args.route}/variants/{args.variant}/adapter/rollback"
    body = admin(args, "POST", path, json={"reason": args.reason})
    return show(
        args,
        body,
        lambda b: print(f"{args.route}/{args.variant}: rolled back {b['previous']} -> {b['adapter']}"),
    )


def cmd_lineage(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"route": args.route}
    if args.since:
        params["since"] = parse_since(args.since)
    if args.until:
        params["until"] = parse_since(args.until)
    body = admin(args, "GET", "/admin/lineage", params=params)
    return show(args, body, lambda b: _print_lineage(args.route, b))


def _print_lineage(route: str, body: dict[str, Any]) -> None:
    print(f"served {route}:")
    for row in body["served"]:
        lineage = row["lineage"] or {}
        trained = (
            f" dataset {lineage['dataset_sha256'][:12]}… ({lineage['dataset_rows']} rows)" if lineage else ""
        )
        print(
            f"  {_when(row['first'])} .. {_when(row['last'])}  {row['variant']:<12} {row['adapter'] or '-':<22} "
            f"policy {row['policy_version']}  {row['requests']} requests{trained}"
        )
    print("changes:")
    for e in reversed(body["changes"]):
        print(f"  {_when(e['at'])}  {e['actor']:<12} {e['action']:<18} {audit_target(e)} {e['reason'] or ''}")


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
