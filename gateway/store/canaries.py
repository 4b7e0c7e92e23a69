"""Canary state rows in the state database (table `canaries`), written by compare-and-set.

Every transition is one transaction holding the new row, the candidate's kill switch when it is a kill, and the
audit entry with the numbers behind the decision, so there is never a decision without its entry nor a kill
without its switch. The row carries a `revision`: a write names the revision it was decided from and fails (and
writes nothing) when another gateway process moved the canary first, so several processes sharing the database
decide each step once.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Final

from gateway.canary.machine import CanaryState, Transition
from gateway.store.state import Flip, StateStore, Transaction

COLUMNS: Final = "route, key, status, step, step_started_at, epoch, started_at, revision"
ACTOR: Final = "canary"  # the actor of automatic decisions in the audit log


class _Lost(Exception):
    """Another process changed the row first: roll the transaction back."""


class CanaryStore:
    def __init__(self, state: StateStore) -> None:
        self.state = state

    def states(self) -> dict[str, CanaryState]:
        rows = self.state.query(f"SELECT {COLUMNS} FROM canaries")
        return {row[0]: CanaryState(*row) for row in rows}

    def start(
        self, new: CanaryState, previous: CanaryState | None, *, detail: dict[str, Any], policy_version: str
    ) -> bool:
        """Start a canary (replacing a row of an older canary on the route); False if another process did."""
        try:
            with self.state.transaction() as tx:
                if previous is None:
                    cursor = tx.execute(
                        f"INSERT OR IGNORE INTO canaries ({COLUMNS}, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (*_values(new), tx.at),
                    )
                else:
                    cursor = _update(tx, new, previous)
                if cursor.rowcount != 1:
                    raise _Lost
                tx.audit(
                    "canary_start",
                    actor=ACTOR,
                    route=new.route,
                    variant=detail.get("candidate"),
                    reason=f"canary {new.key} started",
                    policy_version=policy_version,
                    detail=detail,
                )
        except _Lost:
            return False
        return True

    def apply(
        self,
        before: CanaryState,
        move: Transition,
        *,
        candidate: str,
        actor: str,
        detail: dict[str, Any],
        policy_version: str,
    ) -> bool:
        """Write `move` if the row is still `before`; False (nothing written) if another process moved first."""
        try:
            with self.state.transaction() as tx:
                if _update(tx, move.state, before).rowcount != 1:
                    raise _Lost
                if move.kill:
                    flip = Flip("variant", True, before.route, candidate)
                    tx.flip(flip, actor=actor, reason=move.reason)
                tx.audit(
                    move.action,
                    actor=actor,
                    route=before.route,
                    variant=candidate,
                    reason=move.reason,
                    policy_version=policy_version,
                    detail=detail,
                )
        except _Lost:
            return False
        return True


def _values(s: CanaryState) -> tuple[Any, ...]:
    return (s.route, s.key, s.status, s.step, s.step_started_at, s.epoch, s.started_at, s.revision)


def _update(tx: Transaction, new: CanaryState, previous: CanaryState) -> sqlite3.Cursor:
    return tx.execute(
        "UPDATE canaries SET key = ?, status = ?, step = ?, step_started_at = ?, epoch = ?, started_at = ?,"
        " revision = ?, updated_at = ? WHERE route = ? AND key = ? AND revision = ?",
        (
            new.key,
            new.status,
            new.step,
            new.step_started_at,
            new.epoch,
            new.started_at,
            new.revision,
            tx.at,
            previous.route,
            previous.key,
            previous.revision,
        ),
    )
