"""`gateway canary status|pause|resume|promote|abort` and `gateway drill`, over the admin API.

A drill kills a variant (the route's canary candidate by default) through the ordinary kill-switch route, probes
the route through the gateway meanwhile with requests that name that variant (`x-gateway-variant`: a killed
variant is never served, so they show where its traffic goes), and measures the time from sending the kill until
the first probe from which on every probe was answered by another variant (`--confirm` in a row). Then it revives
the variant, whatever happened, and records the measured time in the audit log (`drill`), where `gateway report`
shows it. The probes need a client key allowed to name a variant (`--api-key`, default $OPENAI_API_KEY).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from gateway.cli.client import CommandError, admin, admin_args, show
from gateway.settings import Settings

OPERATIONS = ("pause", "resume", "promote", "abort")


def add_commands(sub: Any) -> None:
    canary = sub.add_parser("canary", help="a route's canary: status, pause, resume, promote, abort")
    verbs = canary.add_subparsers(required=True, metavar="VERB")
    status = verbs.add_parser("status", help="state, weights and the current look of every canary (or one)")
    status.add_argument("route", nargs="?")
    admin_args(status)
    status.set_defaults(func=cmd_status)
    for op in OPERATIONS:
        verb = verbs.add_parser(op, help=f"{op} the canary of ROUTE (audited)")
        verb.add_argument("route")
        verb.add_argument("--reason", required=True)
        admin_args(verb)
        verb.set_defaults(func=cmd_operate, operation=op)

    drill = sub.add_parser(
        "drill", help="kill a variant, time how long until its traffic is on the fallback, revive"
    )
    drill.add_argument("route")
    drill.add_argument("--variant", help="default: the route's canary candidate")
    drill.add_argument("--api-key", help="a client key allowed to name a variant (default: $OPENAI_API_KEY)")
    drill.add_argument("--confirm", type=int, default=20, help="probes in a row on the fallback that end it")
    drill.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the fallback")
    drill.add_argument("--reason", default="rollback drill")
    admin_args(drill)
    drill.set_defaults(func=cmd_drill)


def cmd_status(args: argparse.Namespace) -> int:
    path = f"/admin/routes/{args.route}/canary" if args.route else "/admin/canaries"
    return show(args, admin(args, "GET", path), lambda body: _print_status(args.route, body))


def _print_status(route: str | None, body: dict[str, Any]) -> None:
    canaries = {route: body} if route else body["canaries"]
    if not canaries:
        print("no route declares a canary")
    for name, c in canaries.items():
        _print_canary(name, c)


def _print_canary(name: str, c: dict[str, Any]) -> None:
    state = c["state"] or {"status": "starting", "step": 0}
    steps = " → ".join(f"{s:g}%" for s in c["steps"])
    weights = ", ".join(f"{v} {w:g}" for v, w in c["weights"].items())
    where = "before step 1" if state["status"] == "shadow" else f"step {state['step'] + 1}/{len(c['steps'])}"
    print(f"{name}: {c['candidate']} vs {c['baseline']}  [{state['status']}]  {where}")
    shadow = c.get("shadow_requests")
    first = f"shadow phase ({shadow} pairs) → " if shadow else ""
    print(f"  steps {first}{steps}; unit {c['unit']}; on_fail {c['on_fail']}; weights now: {weights}")
    seen = c.get("look")
    if seen:
        _print_look(seen)


def _print_look(seen: dict[str, Any]) -> None:
    if seen.get("phase") == "shadow":
        pairs = seen["minimums"]["pairs"]
        print(
            f"  look (shadow phase): {seen['outcome']}; pairs {pairs[0]}/{pairs[1]}; requests routed to the "
            f"candidate {seen['users_served']}"
        )
    else:
        req, minutes = seen["minimums"]["candidate_requests"], seen["minimums"]["minutes"]
        print(
            f"  look: {seen['outcome']}; candidate requests {req[0]}/{req[1]}, minutes {minutes[0]:.2f}/{minutes[1]:g}"
        )
    for check in seen["checks"]:
        stat = check["statistic"]
        shown = "n/a" if stat is None else (stat if isinstance(stat, str) else f"{stat:.4g}")
        print(
            f"    {check['guardrail']:<26} {check['verdict']:<13} statistic {shown} (bound {check['bound']:g})"
        )


def cmd_operate(args: argparse.Namespace) -> int:
    path = f"/admin/routes/{args.route}/canary/{args.operation}"
    body = admin(args, "POST", path, json={"reason": args.reason})
    return show(args, body, lambda c: _print_operated(args.operation, args.route, c))


def _print_operated(operation: str, route: str, c: dict[str, Any]) -> None:
    print(f"{operation}: done")
    _print_canary(route, c)


def cmd_drill(args: argparse.Namespace) -> int:
    variant = args.variant or _candidate(args)
    status = admin(args, "GET", "/admin/status")["routes"].get(args.route)
    if status is None:
        raise CommandError(f"no route {args.route!r}")
    prober = _Prober(args.url or Settings().admin_url, args.route, variant, args.api_key)
    if prober.probe()[1] != variant:
        raise CommandError(f"{args.route}/{variant} does not serve now: nothing to drill")
    kill = f"/admin/routes/{args.route}/variants/{variant}"
    result = prober.measure(
        lambda: admin(args, "POST", kill + "/kill", json={"reason": f"drill: {args.reason}"}),
        confirm=args.confirm,
        timeout=args.timeout,
    )
    admin(args, "POST", kill + "/revive", json={"reason": f"drill over: {args.reason}"})
    if result is None:
        raise CommandError(f"{variant}'s traffic was not all on a fallback within {args.timeout:g} s")
    ms, probes, fallback = result
    record = {"variant": variant, "time_to_baseline_ms": ms, "probes": probes, "fallback": fallback}
    admin(args, "POST", f"/admin/routes/{args.route}/drills", json={**record, "reason": args.reason})
    return show(args, {"route": args.route, **record}, _print_drill)


def _print_drill(r: dict[str, Any]) -> None:
    print(
        f"drill {r['route']}/{r['variant']}: all traffic on {r['fallback']} {r['time_to_baseline_ms']:.1f} ms "
        f"after the kill ({r['probes']} probes)"
    )


def _candidate(args: argparse.Namespace) -> str:
    body = admin(args, "GET", "/admin/canaries")["canaries"].get(args.route)
    if body is None:
        raise CommandError(f"route {args.route!r} has no canary: name the variant with --variant")
    return str(body["candidate"])


class _Prober:
    """Sequential probes through the gateway, each naming the drilled variant, with their send times."""

    def __init__(self, url: str, route: str, variant: str, api_key: str | None) -> None:
        key = api_key or os.environ.get("OPENAI_API_KEY", "")
        self.client = httpx.Client(
            base_url=url.rstrip("/"),
            timeout=10.0,
            headers={"Authorization": f"Bearer {key}", "x-gateway-variant": variant},
        )
        self.body = {
            "model": route,
            "messages": [{"role": "user", "content": "drill probe"}],
            "max_tokens": 1,
        }

    def probe(self) -> tuple[float, str]:
        sent = time.perf_counter()
        response = self.client.post("/v1/chat/completions", json=self.body)
        if response.status_code != 200:
            raise CommandError(f"probe answered {response.status_code}: {response.text[:200]}")
        return sent, response.headers.get("x-gateway-variant", "")

    def measure(
        self, kill: Callable[[], Any], *, confirm: int, timeout: float
    ) -> tuple[float, int, str] | None:
        """(ms from the kill until the fallback took all probes, probes sent, the fallback) or None on timeout."""
        done = threading.Event()
        outcome: list[BaseException] = []

        def send_kill() -> None:
            try:
                kill()
            except BaseException as err:  # reported on the main thread
                outcome.append(err)
            finally:
                done.set()

        started = time.perf_counter()
        threading.Thread(target=send_kill, daemon=True).start()
        return self._until_fallback(started, done, outcome, confirm, timeout)

    def _until_fallback(
        self, started: float, done: threading.Event, failed: list[BaseException], confirm: int, timeout: float
    ) -> tuple[float, int, str] | None:
        streak_from: float | None = None
        streak, probes, served = 0, 0, ""
        while time.perf_counter() - started < timeout:
            if failed:
                raise failed[0]
            sent, served = self.probe()
            probes += 1
            if served == self.client.headers["x-gateway-variant"]:
                streak_from, streak = None, 0
                continue
            streak_from = sent if streak_from is None else streak_from
            streak += 1
            if streak >= confirm and done.is_set():
                return max(0.0, (streak_from - started) * 1000.0), probes, served
        return None
