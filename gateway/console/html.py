"""The console's HTML building blocks: escaping (`h`: everything is escaped unless it is already `Html`), the page
around every signed-in page (navigation, who is signed in, the live region the script refreshes, the confirmation
dialog), action forms with their CSRF token, tables, and the pages that stand alone: sign-in, error,
confirmation. Pure: values in, markup out.

Every control is labelled (a `<label>`, or an `aria-label` naming what it acts on), nothing is inline script or
style (the Content-Security-Policy allows neither), and wide tables scroll inside their own box so that a page
fits a phone's width.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from gateway.console.session import Principal
from gateway.report import amount

STATIC: Final = "/console/static"
NAV: Final = (
    ("/console/routes", "Routes"),
    ("/console/figures", "Figures"),
    ("/console/canaries", "Canaries"),
    ("/console/shadow", "Shadow"),
    ("/console/adapters", "Adapters"),
    ("/console/audit", "Audit log"),
    ("/console/loadtests", "Load tests"),
)


class Html(str):
    """Markup that is already safe: `h` passes it through unescaped."""


def h(value: object) -> Html:
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[object]) -> Html:
    return Html("".join(h(p) for p in parts))


@dataclass(frozen=True, slots=True)
class Chrome:
    """What every signed-in page carries: who, their CSRF token, the refresh period and the page's own URL (the
    path and query an action returns to)."""

    who: Principal
    csrf: str
    refresh_s: float
    here: str


def page(title: str, chrome: Chrome, *, controls: Html | None = None, live: Html) -> str:
    path = chrome.here.split("?", 1)[0]
    nav = join(
        Html(f'<a href="{href}"{" aria-current=page" if path == href else ""}>{h(label)}</a>')
        for href, label in NAV
    )
    role = "may act" if chrome.who.may_act else "read-only"
    sign_out = _hidden({"csrf": chrome.csrf}) + Html('<button type="submit">Sign out</button>')
    return _document(
        title,
        f'<body data-refresh="{int(chrome.refresh_s * 1000)}">'
        '<header class="top"><a class="brand" href="/console/routes">Gateway console</a>'
        f'<nav aria-label="Console pages">{nav}</nav>'
        f'<div class="who">{h(chrome.who.name)} <span class="muted">({role})</span>'
        f'<form method="post" action="/console/sign-out" class="inline">{sign_out}</form></div></header>'
        f"<main><h1>{h(title)}</h1>{controls or ''}"
        f'<div id="live">{live}</div></main>{_dialog() if chrome.who.may_act else ""}</body>',
    )


def _document(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{h(title)} · gateway console</title>"
        f'<link rel="stylesheet" href="{STATIC}/console.css">'
        f'<script src="{STATIC}/console.js" defer></script></head>{body}</html>'
    )


def _dialog() -> str:
    return (
        '<dialog id="confirm-dialog" aria-labelledby="confirm-title"><form method="dialog">'
        '<h2 id="confirm-title">Confirm</h2><p id="confirm-text"></p>'
        '<label for="confirm-reason">Reason (it goes into the audit log)</label>'
        '<input id="confirm-reason" name="reason" required maxlength="1000" autocomplete="off">'
        '<div class="buttons"><button value="cancel" formnovalidate>Cancel</button>'
        '<button value="confirm" id="confirm-ok" class="danger">Confirm</button></div></form></dialog>'
    )


def _hidden(fields: Mapping[str, str]) -> Html:
    return join(Html(f'<input type="hidden" name="{h(k)}" value="{h(v)}">') for k, v in fields.items())


def action_form(
    chrome: Chrome, url: str, fields: Mapping[str, str], *, label: str, does: str, danger: bool = True
) -> Html:
    """A button that posts an action (nothing for a viewer). `does` says what it does ("Kill crm/formatter"):
    the button's accessible name and the question the confirmation asks. The reason and the confirmation are
    filled in by the dialog (the script), or asked for on a page of their own without it."""
    if not chrome.who.may_act:
        return Html("")
    hidden = _hidden({"csrf": chrome.csrf, "back": chrome.here, **fields, "reason": "", "confirm": ""})
    return Html(
        f'<form method="post" action="{h(url)}" class="action" data-confirm="{h(does)}?">{hidden}'
        f'<button type="submit" class="{"danger" if danger else "plain"}" aria-label="{h(does)}">'
        f"{h(label)}</button></form>"
    )


def confirm_page(chrome: Chrome, url: str, fields: Mapping[str, str], does: str, back: str) -> str:
    """The confirmation step without the script: the action's form again, with a reason to fill in."""
    hidden = _hidden({"csrf": chrome.csrf, "back": back, **fields, "confirm": "yes"})
    form = (
        f'<form method="post" action="{h(url)}" class="confirm">{hidden}'
        '<label for="reason">Reason (it goes into the audit log)</label>'
        '<input id="reason" name="reason" required maxlength="1000" autocomplete="off">'
        f'<div class="buttons"><a href="{h(back)}">Cancel</a>'
        f'<button type="submit" class="danger">{h(does)}</button></div></form>'
    )
    return page(f"{does}?", chrome, live=Html(form))


def error_page(status: int, message: str, chrome: Chrome | None) -> str:
    body = Html(f'<p class="error" role="alert">{h(message)}</p><p><a href="/console/routes">Back</a></p>')
    if chrome is None:
        return _document("Error", f"<body><main><h1>Error {status}</h1>{body}</main></body>")
    return page(f"Error {status}", chrome, live=body)


def sign_in_page(*, failed: bool, enabled: bool, next_url: str, wait_s: int = 0) -> str:
    """The sign-in form; after a failed sign-in, or with `wait_s`, when this address must wait to try again."""
    note = ""
    if failed:
        note = '<p class="error" role="alert">That token was not accepted.</p>'
    if wait_s:
        note = (
            '<p class="error" role="alert">Too many failed sign-ins from this address: '
            f"try again in {wait_s} s.</p>"
        )
    if not enabled:
        note = (
            '<p class="error" role="alert">The console is disabled: set GATEWAY_ADMIN_TOKEN or '
            "GATEWAY_VIEWER_TOKEN.</p>"
        )
    form = (
        '<form method="post" action="/console/sign-in" class="sign-in">'
        f"{_hidden({'next': next_url})}"
        '<label for="token">Admin or viewer token</label>'
        '<input id="token" name="token" type="password" required autocomplete="current-password">'
        '<button type="submit">Sign in</button></form>'
    )
    return _document(
        "Sign in", f'<body><main class="narrow"><h1>Gateway console</h1>{note}{form}</main></body>'
    )


@dataclass(frozen=True, slots=True)
class Row:
    """A table row with attributes on its `<tr>` (`data-*` for scripts and tests, `class`)."""

    cells: Sequence[object]
    attrs: Mapping[str, str]


def table(headers: Sequence[str], rows: Iterable[Sequence[object] | Row], *, caption: str) -> Html:
    head = join(Html(f'<th scope="col">{h(x)}</th>') for x in headers)
    body = join(_row(r) for r in rows)
    return Html(
        f'<div class="scroll" role="region" aria-label="{h(caption)}" tabindex="0"><table>'
        f"<caption>{h(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _row(row: Sequence[object] | Row) -> Html:
    cells, attrs = (row.cells, row.attrs) if isinstance(row, Row) else (row, {})
    opening = "".join(f' {h(k)}="{h(v)}"' for k, v in attrs.items())
    return Html(f"<tr{opening}>" + join(Html(f"<td>{h(c)}</td>") for c in cells) + "</tr>")


def select(name: str, label: str, options: Iterable[str], chosen: str, *, blank: str | None = None) -> Html:
    """A labelled select; `blank` adds a first option with the empty value."""
    items = [("", blank)] if blank is not None else []
    items += [(o, o) for o in options]
    opts = join(
        Html(f'<option value="{h(v)}"{" selected" if v == chosen else ""}>{h(text)}</option>')
        for v, text in items
    )
    return Html(
        f'<label for="f-{h(name)}">{h(label)}</label><select id="f-{h(name)}" name="{h(name)}">{opts}</select>'
    )


def text_input(name: str, label: str, value: str) -> Html:
    return Html(
        f'<label for="f-{h(name)}">{h(label)}</label>'
        f'<input id="f-{h(name)}" name="{h(name)}" value="{h(value)}" maxlength="200">'
    )


def filters(action: str, controls: Iterable[Html]) -> Html:
    """A GET form of filters (route, window, ...) with its Apply button."""
    return Html(
        f'<form method="get" action="{h(action)}" class="filters">{join(controls)}'
        '<button type="submit">Apply</button></form>'
    )


def pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.1%}"


def rate_ci(x: int, n: int, rate: float | None, ci: tuple[float, float]) -> str:
    if rate is None:
        return "n/a"
    return f"{x}/{n} {rate:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]"


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def money(by_currency: Mapping[str, float]) -> str:
    if not by_currency:
        return "n/a"
    return "; ".join(f"{amount(v)} {c}" for c, v in sorted(by_currency.items()))


def number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a" if value is None else "∞"
    return f"{value:.3g}"


def when(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
