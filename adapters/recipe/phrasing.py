"""How users write the facts of a deal: account mentions, stage words, amounts, dates and notes. Pure.

Each `*_text` function takes the true value and a seeded `random.Random` and returns one surface form; the true
value is what the correct tool call carries. The one relative date, "next month", follows the rule stated in the
RAG prompt: the first day of the month after the "today" date written in the same message. (Month ends are left
out on purpose, and every date falls on a day from 1 to 28: a tiny model that misjudges a month's length writes
"2026-02-30", an invalid date, and that noise would blur the flawed-answer rates the recipe is tuned to.)
"""

from __future__ import annotations

import calendar
import random
from datetime import date, timedelta

MONTHS = tuple(calendar.month_name)[1:]
COMPANY_HEADS = (
    "Nordwind", "Bluefin", "Helios", "Kestrel", "Alpenglow", "Brightwater", "Cobalt", "Driftwood", "Ember",
    "Fjordline", "Granite", "Harbor", "Ironbark", "Juniper", "Lumen", "Meridian", "Northstar", "Oakridge",
    "Pinecrest", "Quarry", "Redwood", "Saltmarsh", "Tidewater", "Umberfield", "Vantage", "Westbrook", "Yarrow",
    "Zephyr", "Aurora", "Birchwood",
)  # fmt: skip
COMPANY_TAILS = (
    "GmbH",
    "Ltd",
    "Labs",
    "Group",
    "AG",
    "SA",
    "Logistics",
    "Systems",
    "Foods",
    "Energy",
    "Retail",
)

# The words users write for each stage, and the wrong enum values a careless model writes for it.
STAGE_WORDS: dict[str, tuple[str, ...]] = {
    "lead": ("lead", "a new lead", "a lead", "prospect"),
    "qualified": ("qualified", "sales-qualified", "SQL", "qualified lead"),
    "proposal": ("proposal", "proposal sent", "quote sent", "the proposal stage"),
    "negotiation": ("negotiation", "negotiating", "in negotiation", "contract talks"),
    "won": ("won", "closed-won", "closed won", "signed"),
    "lost": ("lost", "closed-lost", "closed lost", "dead"),
}
WRONG_STAGES: dict[str, tuple[str, ...]] = {
    "lead": ("new lead", "prospect", "Lead"),
    "qualified": ("Qualified", "sql", "sales-qualified"),
    "proposal": ("proposal-sent", "Proposal", "quote"),
    "negotiation": ("negotiating", "Negotiation", "in-negotiation"),
    "won": ("closed-won", "Won", "signed"),
    "lost": ("closed-lost", "Lost", "dead"),
}
NOTES = (
    "call back after the budget review", "send the revised quote", "legal is reviewing the contract",
    "champion is the CFO", "needs a security questionnaire", "renewal of last year's contract",
    "pilot with two teams first", "procurement wants net 60", "competitor offered a discount",
    "decision at the board meeting", "wants a reference customer", "price approved by finance",
    "waiting for the signed order form", "expand to the Berlin office", "asked for a multi-year deal",
    "budget cut, deal paused", "chose a cheaper vendor", "follow up with the CTO", "demo went well",
    "needs onboarding in German",
)  # fmt: skip


def company_name(rng: random.Random) -> str:
    return f"{rng.choice(COMPANY_HEADS)} {rng.choice(COMPANY_TAILS)}"


def account_text(name: str, account_id: str, rng: random.Random) -> str:
    """One way to mention the account: always with its number, often with its name."""
    digits = account_id.removeprefix("ACC-")
    ident = rng.choices(
        (account_id, f"acc-{digits}", f"ACC {digits}", f"account no. {digits}"), weights=(6, 2, 1, 1)
    )[0]
    forms = (f"{name} ({ident})", ident, f"{ident} ({name})", f"{name}, {ident}")
    return rng.choices(forms, weights=(4, 3, 2, 1))[0]


def stage_text(stage: str, rng: random.Random) -> str:
    return rng.choice(STAGE_WORDS[stage])


def wrong_stage(stage: str, rng: random.Random) -> str:
    return rng.choice(WRONG_STAGES[stage])


def amount_value(rng: random.Random) -> int:
    """A deal value in EUR, log-uniform from 1,000 to 1,000,000, in whole hundreds (so "€18.5k" is exact)."""
    return max(10, round(10 ** rng.uniform(3.0, 6.0) / 100)) * 100


def amount_text(amount: int, rng: random.Random) -> str:
    thousands = f"{amount / 1000:g}"
    forms = (
        f"{amount:,} EUR",
        f"€{thousands}k",
        f"{amount} euros",
        f"EUR {amount:,}",
        f"€{amount:,}",
        f"{thousands}k EUR",
    )
    return rng.choice(forms)


def on_a_safe_day(day: date) -> date:
    """Move a date to the 28th when it falls later in the month: every sampled day number is then a real date in
    any month, so the invalid-call rate counts the flaw kinds, not a tiny model's sense of month lengths."""
    return day.replace(day=min(day.day, 28))


def today_value(rng: random.Random) -> date:
    return on_a_safe_day(date(2025, 6, 1) + timedelta(days=rng.randrange(760)))


def first_of_next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def absolute_date_text(day: date, rng: random.Random) -> str:
    month = MONTHS[day.month - 1]
    forms = (
        day.isoformat(),
        f"{month} {ordinal(day.day)} {day.year}",
        f"{month} {day.day}, {day.year}",
        f"{day.day} {month} {day.year}",
    )
    return rng.choices(forms, weights=(4, 2, 2, 2))[0]


def close_date(today: date, rng: random.Random, relative_share: float) -> tuple[date, str]:
    """The close date and how the user wrote it: relative (to today) in `relative_share` of messages."""
    if rng.random() < relative_share:
        return first_of_next_month(today), "next month"
    day = on_a_safe_day(today + timedelta(days=rng.randint(3, 240)))
    return day, absolute_date_text(day, rng)


def today_text(today: date, rng: random.Random) -> str:
    iso = today.isoformat()
    return rng.choice((f"Today is {iso}.", f"(today: {iso})", f"As of {iso}:"))


def note_text(note: str, rng: random.Random) -> str:
    return rng.choice((f"Note: {note}.", f"Add a note: {note}.", f"(note: {note})"))
