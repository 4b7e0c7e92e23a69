"""A load test's results: per-variant figures, paired comparisons, band checks, as one JSON-ready dict. Pure.

Definitions match `gateway report` (`report.summarize`), so the two agree on the same window:
- a variant is the one that answered (`x-gateway-variant`); a request with no answer counts for the variant it
  asked for (paired) or `-`;
- errors: 5xx answers, streams that carried an error event or ended early, no answer at all; 4xx answers are
  client errors, counted apart;
- invalid rate = invalid / (valid + invalid) over verdicts the gateway gave; `none` and `truncated` are counted
  apart (a tool route's `none` often hides broken JSON: look at it);
- cost per request = cost of the priced requests / their number, usage × the variant's price (`pricing.cost`);
  per 1,000 requests is that × 1,000.
Task success is the runner's own: the answer's one call equals the golden set's, argument by argument, over every
request whose item has an expected call (an error is a failed task). Rates carry 95 % Wilson intervals; latency
percentiles are `stats.percentile`'s (type 7), and each latency also keeps 101 quantiles for the report's plots.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.loadtest.answer import VERDICTS, Sample
from gateway.loadtest.scenario import Band, Loaded
from gateway.pricing import Price, cost
from gateway.stats import Paired, mcnemar, paired_difference_ci, percentile, wilson

FORMAT: Final = "gateway-loadtest/1"
NO_VARIANT: Final = "-"
OVERALL: Final = "(all)"


@dataclass(slots=True)
class RunData:
    """What a run produced: the measured samples and the window they were sent in."""

    samples: list[Sample]
    started_at: float  # epoch seconds when the measured phase began (comparable with a gateway record's `ts`)
    ended_at: float  # epoch seconds when its last answer arrived
    elapsed_s: float
    warmup: int
    runner_cpu_s: float  # the runner process's CPU time during the measured phase
    request_id_prefix: str


def variant_of(sample: Sample) -> str:
    return sample.variant or sample.requested or NO_VARIANT


@dataclass(slots=True)
class _Tally:
    samples: list[Sample] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    wrong: Counter[str] = field(default_factory=Counter)
    cost: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    priced: Counter[str] = field(default_factory=Counter)

    def add(self, s: Sample, price: Price | None) -> None:
        self.samples.append(s)
        if s.outcome != "ok":
            self.errors[f"{s.outcome}:{s.error}"] += 1
        self.verdicts[s.verdict] += 1
        self.wrong.update(s.wrong)
        amount = cost(price, s.input_tokens, s.output_tokens)
        if amount is not None and price is not None:
            self.cost[price.currency] += amount
            self.priced[price.currency] += 1


def summarize(run: RunData, loaded: Loaded) -> dict[str, Any]:
    scenario = loaded.scenario
    tallies: dict[str, _Tally] = defaultdict(_Tally)
    overall = _Tally()
    for s in run.samples:
        price = loaded.prices.get(variant_of(s))
        tallies[variant_of(s)].add(s, price)
        overall.add(s, price)
    order = [*scenario.compare.variants, *sorted(set(tallies) - set(scenario.compare.variants))]
    fields = _fields(loaded)
    return {
        "format": FORMAT,
        "scenario": _scenario(loaded),
        "window": _window(run),
        "load": _load(run, loaded),
        "variants": [
            _variant(name, tallies[name], fields, scenario.expect.get(name))
            for name in order
            if name in tallies
        ],
        # Every measured request together: what a run against a target without variants (an engine) compares on.
        "overall": _variant(OVERALL, overall, fields, None),
        "paired": _paired_all(run.samples, scenario.compare.variants, scenario.compare.reference)
        if scenario.compare.mode == "paired"
        else [],
    }


def _fields(loaded: Loaded) -> list[str]:
    names = {name for item in loaded.golden if item.expected for name in item.expected["arguments"]}
    return sorted(names)


def _scenario(loaded: Loaded) -> dict[str, Any]:
    s = loaded.scenario
    return {
        "name": s.name,
        "description": s.description,
        "file": str(loaded.path),
        "url": s.target.url,
        "route": s.target.route,
        "mode": s.compare.mode,
        "variants": list(s.compare.variants),
        "reference": s.compare.reference,
        "arrival": s.load.arrival,
        "rate": s.load.rate,
        "concurrency": s.load.concurrency,
        "stream": s.requests.stream,
        "golden": s.requests.golden,
        "golden_rows": len(loaded.golden),
        "seed": s.load.seed,
        "expect": {name: band.model_dump(exclude_none=True) for name, band in s.expect.items()},
    }


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _window(run: RunData) -> dict[str, Any]:
    return {
        "started_at": run.started_at,
        "ended_at": run.ended_at,
        "started": _iso(run.started_at),
        "ended": _iso(run.ended_at),
        "request_id_prefix": run.request_id_prefix,
    }


def _load(run: RunData, loaded: Loaded) -> dict[str, Any]:
    load = loaded.scenario.load
    n = len(run.samples)
    lateness = [s.late_s for s in run.samples if s.scheduled_s is not None]
    late_after = load.late_after_ms / 1000
    return {
        "requests": n,
        "warmup": run.warmup,
        "elapsed_s": run.elapsed_s,
        "achieved_rate": n / run.elapsed_s if run.elapsed_s > 0 else None,
        "offered_rate": load.rate,
        "late_after_ms": load.late_after_ms if lateness else None,
        "late": sum(1 for x in lateness if x > late_after),
        "lateness_ms": _ms_percentiles(lateness),
        "runner_cpu_s": run.runner_cpu_s,
        "runner_cpu_us_per_request": 1e6 * run.runner_cpu_s / n if n else None,
    }


def _ms_percentiles(values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}": _ms(percentile(values, q)) for q in (50, 90, 99)} | {
        "max": _ms(max(values, default=None))
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _rate(x: int, n: int) -> dict[str, Any]:
    low, high = wilson(x, n)
    return {"count": x, "n": n, "rate": x / n if n else None, "ci": [low, high]}


def _latency(values: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(values)
    out: dict[str, Any] = {"n": len(ordered)}
    out.update({f"p{q}": _ms(percentile(ordered, q)) for q in (50, 90, 99)})
    out["mean"] = _ms(sum(ordered) / len(ordered)) if ordered else None
    out["quantiles"] = [_ms(percentile(ordered, q)) for q in range(101)] if ordered else []
    return out


def _variant(name: str, t: _Tally, fields: Sequence[str], band: Band | None) -> dict[str, Any]:
    ss = t.samples
    n = len(ss)
    errors = sum(1 for s in ss if s.outcome == "error")
    judged = [s for s in ss if s.success is not None]
    checked = t.verdicts["valid"] + t.verdicts["invalid"]
    figures: dict[str, Any] = {
        "variant": name,
        "requests": n,
        "ok": sum(1 for s in ss if s.outcome == "ok"),
        "errors": _rate(errors, n),
        "client_errors": sum(1 for s in ss if s.outcome == "client_error"),
        "errors_by_code": dict(sorted(t.errors.items())),
        "rerouted": sum(1 for s in ss if s.requested is not None and s.variant not in (None, s.requested)),
        "verdicts": {v: t.verdicts[v] for v in VERDICTS},
        "invalid": _rate(t.verdicts["invalid"], checked),
        "success": _rate(sum(1 for s in judged if s.success), len(judged)),
        "field_accuracy": {f: 1 - t.wrong[f] / len(judged) for f in fields} if judged else {},
        "ttft_ms": _latency([s.ttft_s for s in ss if s.ttft_s is not None]),
        "tpot_ms": _latency([s.tpot_s for s in ss if s.tpot_s is not None]),
        "e2e_ms": _latency([s.e2e_s for s in ss if s.e2e_s is not None]),
        "input_tokens": sum(s.input_tokens or 0 for s in ss),
        "output_tokens": sum(s.output_tokens or 0 for s in ss),
        "cost_total": dict(t.cost),
        "cost_per_request": {c: total / t.priced[c] for c, total in t.cost.items()},
        "cost_per_1k_requests": {c: 1000 * total / t.priced[c] for c, total in t.cost.items()},
    }
    figures["bands"] = _bands(band, figures) if band is not None else {}
    return figures


_BAND_FIGURES: Final = {"invalid_rate": "invalid", "success_rate": "success", "error_rate": "errors"}


def _bands(band: Band, figures: Mapping[str, Any]) -> dict[str, Any]:
    """Each declared band: is the point estimate in it, and does the 95 % interval settle the question?"""
    out = {}
    for key, figure in _BAND_FIGURES.items():
        limits = getattr(band, key)
        if limits is None:
            continue
        low, high = limits
        rate, (ci_low, ci_high) = figures[figure]["rate"], figures[figure]["ci"]
        inside = rate is not None and low <= rate <= high
        settled = (low <= ci_low and ci_high <= high) if inside else (ci_high < low or ci_low > high)
        out[key] = {"band": [low, high], "rate": rate, "inside": inside, "settled": settled}
    return out


# --- paired ---------------------------------------------------------------------------------------------------


def _paired_all(
    samples: Iterable[Sample], variants: Sequence[str], reference: str | None
) -> list[dict[str, Any]]:
    groups: dict[int, dict[str, Sample]] = defaultdict(dict)
    width = len(variants)
    for s in samples:
        if s.requested is not None:
            groups[s.seq // width][s.requested] = s
    return [_pair(groups, reference, other) for other in variants if reference and other != reference]


def _pair(groups: Mapping[int, Mapping[str, Sample]], reference: str, candidate: str) -> dict[str, Any]:
    complete = [(g[reference], g[candidate]) for g in groups.values() if reference in g and candidate in g]
    clean = [(a, b) for a, b in complete if _as_asked(a) and _as_asked(b)]
    success = [(a.success, b.success) for a, b in clean if a.success is not None and b.success is not None]
    checked = ("valid", "invalid")
    invalid = [
        (a.verdict == "invalid", b.verdict == "invalid")
        for a, b in clean
        if a.verdict in checked and b.verdict in checked
    ]
    return {
        "reference": reference,
        "candidate": candidate,
        "pairs": len(complete),
        "rerouted": len(complete) - len(clean),  # either answer came from another variant: left out
        "success": _paired_figures(success),
        "invalid": _paired_figures(invalid),
    }


def _as_asked(s: Sample) -> bool:
    return s.variant is None or s.variant == s.requested


def _paired_figures(pairs: Sequence[tuple[bool, bool]]) -> dict[str, Any]:
    c = Counter(pairs)
    table = Paired(c[True, True], c[True, False], c[False, True], c[False, False])
    test = mcnemar(table.n10, table.n01)
    low, high = paired_difference_ci(table)
    return {
        "n": table.n,
        "both": table.n11,
        "reference_only": table.n10,
        "candidate_only": table.n01,
        "neither": table.n00,
        "reference_rate": table.reference_rate,
        "candidate_rate": table.candidate_rate,
        "difference": table.difference,
        "difference_ci": [low, high],
        "p_value": test.p_value,
        "test": test.method,
    }
