"""The caller's recorder keys its level series by track, not by participant identity (issue 13,
item 6): a participant that publishes again under the same identity (a rejoin, a server restart)
has two tracks, and one series of both put the filler 13 s early in one demo run. No server: the
recorder's bookkeeping and its playout placement only."""

from __future__ import annotations

from typing import Any

from peers import Recorder, played_at


class NoRoom:
    def on(self, _event: str, _cb: Any) -> None:
        pass


def frames(start: float, seconds: float, level: float) -> list[tuple[float, float]]:
    """10 ms frames arriving on time from ``start``."""
    return [(start + i * 0.01, level) for i in range(int(seconds * 100))]


def test_two_tracks_of_one_identity_stay_in_place() -> None:
    rec = Recorder(NoRoom())  # type: ignore[arg-type]
    # the old track keeps delivering (silence) for 10 s while the agent's new track plays
    rec.levels = {"TR_old": frames(0.0, 12.0, -90.0), "TR_new": frames(2.0, 10.0, -20.0)}
    rec.owners = {"TR_old": "agent-triage", "TR_new": "agent-triage"}
    played = rec.played()["agent-triage"]
    loud = [t for t, level in played if level > -55]
    assert abs(loud[0] - 2.0) < 0.02 and abs(loud[-1] - 11.99) < 0.02, (loud[0], loud[-1])
    assert [t for t, _ in played] == sorted(t for t, _ in played)
    assert len(rec.arrived()["agent-triage"]) == 2200

    # what keying by identity did: both tracks in one series, placed as one stream of 200
    # frames a second, pushes the new track's first sound back by seconds
    merged = sorted(rec.levels["TR_old"] + rec.levels["TR_new"])
    wrong = [t for t, level in played_at(merged) if level > -55]
    assert wrong[0] < 2.0 - 5.0, wrong[0]
