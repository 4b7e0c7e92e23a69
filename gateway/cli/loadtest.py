"""`gateway loadtest SCENARIO [--out DIR]` and `gateway loadtest compare A.json B.json`: the load test's shell.

Reads the scenario (`loadtest.scenario`), runs it (`loadtest.client`), and writes into the output directory:
`result.json` (the figures, `loadtest.results`), `report.html` (a self-contained page with inline SVG plots,
`loadtest.html`) and `requests.jsonl` (one line per measured request, the client's view). It prints the table
(`loadtest.text`) and the `gateway report` command that covers the same window.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from gateway.cli.client import CommandError


def _failed(message: str) -> CommandError:
    return CommandError(message, command="gateway loadtest")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "loadtest",
        help="run a load-test scenario, or compare two runs (loadtest compare A.json B.json)",
        description="Run SCENARIO (a TOML file), or `compare A.json B.json` to show what changed between runs.",
    )
    p.add_argument("scenario", help="the scenario file, or the word compare")
    p.add_argument("results", nargs="*", type=Path, help="compare: the two result.json files")
    p.add_argument(
        "--out",
        type=Path,
        help="output directory (default: $GATEWAY_LOADTEST_DIR or var/loadtests, /NAME-TIME)",
    )
    p.add_argument("--url", help="target gateway URL (overrides target.url)")
    p.add_argument("--requests", type=int, help="measured requests (overrides load.requests/duration_s)")
    p.add_argument("--duration", type=float, help="seconds to run (overrides load.requests/duration_s)")
    p.add_argument("--rate", type=float, help="requests per second (open loop)")
    p.add_argument("--concurrency", type=int, help="concurrent clients (closed loop)")
    p.add_argument("--warmup", type=int, help="warm-up requests")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument(
        "--fail-on-band", action="store_true", help="exit 3 when a rate is outside its [expect] band"
    )
    p.set_defaults(func=cmd_loadtest)


def cmd_loadtest(args: argparse.Namespace) -> int:
    if args.scenario == "compare":
        return _compare(args.results)
    if args.results:
        raise _failed(f"unexpected arguments: {' '.join(map(str, args.results))}")
    return _run(args)


def _compare(paths: list[Path]) -> int:
    from gateway.loadtest.text import compare

    if len(paths) != 2:
        raise _failed("compare takes two result files: gateway loadtest compare A.json B.json")
    a, b = (_read_result(p) for p in paths)
    sys.stdout.write(compare(a, b))
    return 0


def _read_result(path: Path) -> dict[str, Any]:
    from gateway.loadtest.results import FORMAT

    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise _failed(f"{path}: cannot read a result: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _failed(f"{path}: not a load-test result ({FORMAT})")
    return doc


def _run(args: argparse.Namespace) -> int:
    from gateway.loadtest.client import LoadTestError, run
    from gateway.loadtest.results import summarize
    from gateway.loadtest.scenario import load_scenario
    from gateway.loadtest.text import format_result

    loaded = load_scenario(
        Path(args.scenario),
        url=args.url,
        requests=args.requests,
        duration_s=args.duration,
        rate=args.rate,
        concurrency=args.concurrency,
        warmup=args.warmup,
        stream=args.stream,
    )
    try:
        data = run(loaded, loaded.scenario.target.key(), progress=None if args.quiet else sys.stderr)
    except LoadTestError as err:
        raise _failed(str(err)) from None
    doc = summarize(data, loaded)
    from gateway.settings import DEFAULT_LOADTEST_DIR

    runs = Path(os.environ.get("GATEWAY_LOADTEST_DIR") or DEFAULT_LOADTEST_DIR)  # where the console looks
    out = args.out or runs / f"{loaded.scenario.name}-{_stamp(data.started_at)}"
    write_outputs(out, doc, data.samples)
    sys.stdout.write(format_result(doc))
    window = doc["window"]
    print(
        f"\nwritten: {out}/result.json, report.html, requests.jsonl\n"
        f"the gateway's own figures for this window: gateway report --route {loaded.scenario.target.route} "
        f"--since {window['started']} --until {window['ended']}"
    )
    out_of_band = any(not b["inside"] for v in doc["variants"] for b in v["bands"].values())
    return 3 if args.fail_on_band and out_of_band else 0


def write_outputs(out: Path, doc: dict[str, Any], samples: list[Any]) -> None:
    from gateway.loadtest.html import render

    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    (out / "report.html").write_text(render(doc), encoding="utf-8")
    with (out / "requests.jsonl").open("wb") as f:
        for sample in samples:
            f.write(orjson.dumps(dataclasses.asdict(sample)) + b"\n")


def _stamp(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
