"""`LiveView`: the one holder of what requests read, the `View` built from the policy files, the operators' adapter
pins, the canaries' states, the operators' shadow overrides and the kill switches, and the console sessions
signed out. Only `control.operations` changes it.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.canary.machine import CanaryState, with_canaries
from gateway.policy import PolicySnapshot, Switches, View, build_view, with_pins
from gateway.shadow.overrides import ShadowOverride, with_shadow_overrides


class LiveView:
    """The one holder of what requests read. Each change builds a whole new `View` and swaps one reference, so a
    request that read `.view` once sees one policy and one set of switches, never a mix."""

    def __init__(
        self,
        policy: PolicySnapshot,
        switches: Switches,
        pins: Mapping[tuple[str, str], str] | None = None,
        canaries: Mapping[str, CanaryState] | None = None,
        shadow_overrides: Mapping[str, ShadowOverride] | None = None,
        ended_sessions: frozenset[str] = frozenset(),
    ) -> None:
        self.files = policy  # as the policy files say; `view.policy` has pins, canaries, overrides applied
        self.pins: Mapping[tuple[str, str], str] = dict(pins or {})
        self.canaries: Mapping[str, CanaryState] = dict(canaries or {})
        self.shadow_overrides: Mapping[str, ShadowOverride] = dict(shadow_overrides or {})
        self.declared = policy  # `view.policy` before the shadow overrides (set by `_compose`)
        self.view: View = build_view(self._compose(), switches)
        # The ids of console sessions signed out on any replica: the console refuses their cookies.
        self.ended_sessions = ended_sessions

    def _compose(self) -> PolicySnapshot:
        self.declared = with_canaries(with_pins(self.files, self.pins), self.canaries)
        return with_shadow_overrides(self.declared, self.shadow_overrides)

    def set_policy(self, policy: PolicySnapshot) -> View:
        self.files = policy
        self.view = build_view(self._compose(), self.view.switches)
        return self.view

    def set_pins(self, pins: Mapping[tuple[str, str], str]) -> View:
        self.pins = dict(pins)
        self.view = build_view(self._compose(), self.view.switches)
        return self.view

    def set_canaries(self, canaries: Mapping[str, CanaryState]) -> View:
        """The canaries' states (steps, promotions, aborts) as the state database says now."""
        if dict(canaries) != self.canaries:
            self.canaries = dict(canaries)
            self.view = build_view(self._compose(), self.view.switches)
        return self.view

    def set_shadow_overrides(self, overrides: Mapping[str, ShadowOverride]) -> View:
        if dict(overrides) != self.shadow_overrides:
            self.shadow_overrides = dict(overrides)
            self.view = build_view(self._compose(), self.view.switches)
        return self.view

    def preview_pins(self, pins: Mapping[tuple[str, str], str]) -> PolicySnapshot:
        return with_pins(self.files, pins)

    def set_switches(self, switches: Switches) -> View:
        if switches != self.view.switches:
            self.view = build_view(self.view.policy, switches)
        return self.view
