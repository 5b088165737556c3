"""The source filler (lk_baton.filler): the handing-off agent's own comfort noise on its
``baton-filler`` track, from the end of its sentence until baton's ``filler_stop``.

``SourceFiller`` on its own runs on a virtual clock (fakes.run_virtual) with a recording audio
source that paces at real time (fakes.FakeAudioSource), so frame counts are exact and a 20 s
bound takes no wall-clock time. Through ``BatonLink.handoff`` it runs over the in-memory rooms
against the scripted baton of fakes.py, the same way; one test keeps the default wiring (a
real ``rtc.AudioSource`` and ``rtc.LocalAudioTrack``) on a real clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from fakes import FakeAudioSource, FakeBaton, FakeRoom, FakeTrack, Net, ScriptedLLM, run_virtual
from livekit import rtc
from livekit.agents import Agent, AgentSession

from lk_baton import FILLER_TRACK_NAME, HandoffRefused, SourceFiller, comfort_noise_loop
from lk_baton.agents import BatonLink
from lk_baton.filler import FILLER_HOLD_S, FILLER_MAX_S, FILLER_NOISE_DBFS

FRAME = 960  # samples in 20 ms at 48 kHz
FRAMES_PER_S = 50
FADE_FRAMES = 13  # the adapter's own 250 ms fade: 12.5 frames, the last one part silence
Frames = list[np.ndarray[Any, np.dtype[np.int16]]]


def dbfs(pcm: np.ndarray[Any, Any]) -> float:
    rms = float(np.sqrt(np.mean(np.asarray(pcm, dtype=np.float64) ** 2)))
    return 20 * np.log10(max(rms, 1e-9) / 32767)


def silent(frames: Frames) -> bool:
    return all(not f.any() for f in frames)


def filler_in(room: FakeRoom, **kw: Any) -> tuple[SourceFiller, FakeAudioSource]:
    source = FakeAudioSource()
    filler = SourceFiller(room, source=source, track=FakeTrack(FILLER_TRACK_NAME), **kw)  # type: ignore[arg-type]
    return filler, source


async def run_for(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def started(room: FakeRoom, **kw: Any) -> tuple[SourceFiller, FakeAudioSource]:
    """A filler published and playing, with nothing captured before its start."""
    filler, source = filler_in(room, **kw)
    assert await filler.publish()
    assert filler.start()
    return filler, source


# ---------------------------------------------------------------------------------------------
# The sound


def test_the_noise_loop_is_made_off_the_event_loop_when_the_filler_is_created() -> None:
    # The first noise frame must not compute the loop on the agent's event loop (it blocked it
    # for up to 0.7 s at the end of the transfer sentence in a fresh job process).
    level = -44.25  # a level no other test uses, so the cache does not hold it yet
    before = comfort_noise_loop.cache_info().currsize
    filler_in(FakeRoom(Net(), "agent-triage"), noise_dbfs=level)
    deadline = time.monotonic() + 10
    while comfort_noise_loop.cache_info().currsize == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert comfort_noise_loop.cache_info().currsize == before + 1, "no loop made at creation"
    hits = comfort_noise_loop.cache_info().hits
    comfort_noise_loop(level)
    assert comfort_noise_loop.cache_info().hits == hits + 1, "the first frame finds it made"


def test_comfort_noise_is_pink_at_minus_45_dbfs_rms_and_loops_without_a_click() -> None:
    loop = comfort_noise_loop()
    assert loop.dtype == np.int16 and len(loop) == 3 * 48_000
    assert abs(dbfs(loop) - FILLER_NOISE_DBFS) < 1.5, dbfs(loop)
    assert comfort_noise_loop() is loop, "computed once per process"
    # pink: about equal energy per octave (white noise would put 8x more in the upper one)
    spectrum = np.abs(np.fft.rfft(loop.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(loop), 1 / 48_000)

    def octave(lo: float) -> float:
        return float(spectrum[(freqs >= lo) & (freqs < 2 * lo)].sum())

    assert abs(10 * np.log10(octave(2000) / octave(250))) < 2.0
    # the wrap from the last sample to the first is no bigger a step than any other
    steps = np.abs(np.diff(loop.astype(np.int32)))
    assert abs(int(loop[0]) - int(loop[-1])) <= steps.max()


def test_played_noise_is_minus_45_dbfs_after_a_fade_in_from_minus_3_db() -> None:
    async def main() -> None:
        room = FakeRoom(Net(), "agent-triage")
        filler, source = await started(room)
        await run_for(3.2)  # more than one loop
        loop = comfort_noise_loop()
        frames = source.frames
        first = frames[0].astype(np.float64)
        steady = loop[:FRAME].astype(np.float64)
        # the first frame starts 3 dB down and is quieter than the same samples at full level
        head = slice(0, 96)  # the first 2 ms, where the ramp has barely moved
        gain = float(first[head] @ steady[head] / (steady[head] @ steady[head]))
        assert abs(gain - 10 ** (-3 / 20)) < 0.02, gain
        assert dbfs(first) < dbfs(steady) - 0.5
        assert dbfs(first) > dbfs(steady) - 3.0
        # after 40 ms it is the loop itself, sample for sample
        assert np.array_equal(frames[2], loop[2 * FRAME : 3 * FRAME])
        one_loop = np.concatenate(frames[2 : 2 + 150])
        assert abs(dbfs(one_loop) - FILLER_NOISE_DBFS) < 1.5, dbfs(one_loop)
        await filler.aclose()

    run_virtual(main)


# ---------------------------------------------------------------------------------------------
# Publication and pre-roll


def test_publish_once_then_preroll_silence_until_start_and_nothing_while_idle() -> None:
    async def main() -> None:
        room = FakeRoom(Net(), "agent-triage")
        filler, source = filler_in(room)
        await run_for(1.0)
        assert source.frames == [] and room.tracks == {}, "nothing before the first handoff"
        filler.arm()
        assert not filler.published, "arm does not wait for the publication"
        await run_for(0.2)
        (pub,) = room.tracks.values()
        assert pub.track.name == FILLER_TRACK_NAME == "baton-filler"
        assert pub.options.source == rtc.TrackSource.SOURCE_UNKNOWN
        assert pub.options.dtx is False
        assert 9 <= len(source.frames) <= 11 and silent(source.frames), "pre-roll: silence"
        assert filler.start()
        assert source.cleared == 1, "the queued pre-roll is dropped at the start"
        await run_for(0.2)
        assert not silent(source.frames[-9:])
        filler.stop(0)
        n = len(source.frames)
        await run_for(2.0)
        assert len(source.frames) <= n + 1, "idle: nothing streamed"
        # a later handoff: already published, the pre-roll starts at once
        filler.arm()
        assert filler.published and len(room.tracks) == 1 and room.published_count == 1
        await run_for(0.1)
        assert silent(source.frames[-4:]) and len(source.frames) > n + 1
        filler.stop(250)
        assert filler.mode == "idle", "a pre-roll just ends"
        await filler.aclose()
        assert room.tracks == {} and room.unpublished == [pub.sid]
        assert not source.closed, "a source given to the filler is its owner's to close"

    run_virtual(main)


def test_start_before_the_track_is_published_is_refused_and_ends_the_preroll() -> None:
    async def main() -> None:
        room = FakeRoom(Net(), "agent-triage")
        room.publish_delay = 0.5
        filler, source = filler_in(room)
        filler.arm()
        await run_for(0.1)
        assert not filler.start() and filler.mode == "idle"
        await run_for(1.0)
        assert filler.published, "the publication goes on, for the next handoff"
        assert source.frames == [], "no pre-roll for a filler that will not play"
        await filler.aclose()

    run_virtual(main)


def test_a_failed_publication_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        room = FakeRoom(Net(), "agent-triage")
        room.publish_error = "not connected"
        filler, source = filler_in(room)
        filler.arm()
        assert not await filler.publish()
        assert not filler.start() and source.frames == []
        room.publish_error = None
        assert await filler.publish(), "tried again on the next call"
        await filler.aclose()

    with caplog.at_level(logging.WARNING, logger="lk_baton.filler"):
        run_virtual(main)
    assert "could not publish track baton-filler: not connected" in caplog.text


# ---------------------------------------------------------------------------------------------
# Stops


def test_stop_fades_over_fade_ms_then_streams_nothing() -> None:
    async def main() -> None:
        room = FakeRoom(Net(), "agent-triage")
        filler, source = await started(room)
        await run_for(0.5)
        n = len(source.frames)
        filler.stop(1000, why="filler_stop")
        await run_for(3.0)
        fade = source.frames[n:]
        assert len(fade) == 1000 // 20, len(fade)
        levels = [dbfs(f) for f in fade]
        assert levels[0] > FILLER_NOISE_DBFS - 1.0
        # falling all the way (linear gain: each quarter quieter than the last)
        quarters = [dbfs(np.concatenate(fade[i : i + 12])) for i in range(0, 48, 12)]
        assert quarters == sorted(quarters, reverse=True), quarters
        assert abs(int(fade[-1][-1])) <= 1, "the fade ends in silence"
        assert filler.mode == "idle" and filler.stopped_by == "filler_stop"
        await run_for(2.0)
        assert len(source.frames) == n + 50, "nothing after the fade"
        await filler.aclose()

    run_virtual(main)


def test_stop_at_once_and_the_fade_is_clamped_to_5_s() -> None:
    async def main() -> None:
        room = FakeRoom(Net(), "agent-triage")
        filler, source = await started(room)
        await run_for(0.2)
        cleared = source.cleared
        filler.stop(0)
        n = len(source.frames)
        assert filler.mode == "idle" and source.cleared == cleared + 1, "queued audio dropped"
        await run_for(1.0)
        assert len(source.frames) <= n + 1
        assert filler.start()
        await run_for(0.2)
        n = len(source.frames)
        filler.stop(60_000)
        await run_for(8.0)
        assert len(source.frames) - n == 5000 // 20
        await filler.aclose()

    run_virtual(main)


def test_hold_until_speaking_fades_when_the_agent_speaks() -> None:
    async def main() -> None:
        room = FakeRoom(Net(), "agent-triage")
        speaking = False
        filler, source = await started(room, speaking=lambda: speaking)
        await run_for(2.0)
        filler.hold_until_speaking()
        await run_for(0.3)
        speaking = True
        n = len(source.frames)
        await run_for(2.0)
        assert filler.stopped_by == "heard"
        assert len(source.frames) - n <= FADE_FRAMES + 1, "a 250 ms fade from the next frame"
        assert filler.mode == "idle"
        await filler.aclose()

    run_virtual(main)


def test_hold_until_speaking_gives_up_after_its_cap() -> None:
    async def main() -> None:
        room = FakeRoom(Net(), "agent-triage")
        filler, source = await started(room, speaking=lambda: False)
        await run_for(1.0)
        n = len(source.frames)
        filler.hold_until_speaking(FILLER_HOLD_S)
        await run_for(5.0)
        assert filler.stopped_by == "hold_limit"
        held = len(source.frames) - n
        assert held == round(FILLER_HOLD_S * FRAMES_PER_S) + FADE_FRAMES, held
        await filler.aclose()

    run_virtual(main)


def test_never_plays_longer_than_max_s(caplog: pytest.LogCaptureFixture) -> None:
    assert FILLER_MAX_S == 20.0

    async def main() -> None:
        room = FakeRoom(Net(), "agent-triage")
        filler, source = await started(room)
        await run_for(30.0)
        assert filler.stopped_by == "max" and filler.mode == "idle"
        noise = [f for f in source.frames if f.any()]
        assert len(noise) == 20 * FRAMES_PER_S + FADE_FRAMES, len(noise)
        n = len(source.frames)
        await run_for(5.0)
        assert len(source.frames) == n
        await filler.aclose()

    with caplog.at_level(logging.WARNING, logger="lk_baton.filler"):
        run_virtual(main)
    assert "played 20.0 s without filler_stop" in caplog.text


def test_aclose_cancels_everything_and_unpublishes() -> None:
    async def main() -> None:
        room = FakeRoom(Net(), "agent-triage")
        filler, source = await started(room)
        await run_for(0.5)
        await filler.aclose()
        assert filler.stopped_by == "closed" and room.tracks == {}
        assert filler._tasks == set()
        n = len(source.frames)
        await run_for(1.0)
        assert len(source.frames) == n
        filler.arm()
        assert not filler.start() and room.tracks == {}, "a closed filler stays closed"
        # a room already gone is not asked to unpublish
        room2 = FakeRoom(Net(), "agent-billing")
        other, _ = await started(room2)
        room2.disconnected = True
        await other.aclose()
        assert room2.unpublished == []

    run_virtual(main)


# ---------------------------------------------------------------------------------------------
# Through BatonLink.handoff


async def linked(
    net: Net, *, fake: bool = True, **options: Any
) -> tuple[FakeRoom, AgentSession[None], BatonLink, Agent, FakeAudioSource | None]:
    room = FakeRoom(net, "agent-triage")
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM(lambda _ctx: ("", [])))
    link = await BatonLink.attach(room, session, agent_name="triage", on_activate=None, **options)  # type: ignore[arg-type]
    agent = Agent(instructions="triage")
    await session.start(agent)
    source = None
    if fake and link.filler is not None:
        link.filler, source = filler_in(room, speaking=link.effects.speaking)
    return room, session, link, agent, source


def requests(baton: FakeBaton) -> list[dict[str, Any]]:
    return [m for w, m in baton.got if w == "agent-triage" and m["type"] == "handoff"]


async def published_first(link: BatonLink) -> None:
    """The track is published at the first handoff, while the sentence plays out: a handoff
    called without a sentence to wait for (no run_ctx) stands for a later one."""
    assert link.filler is not None
    assert await link.filler.publish()


@dataclass
class HandedOff:
    """Triage after a handoff baton accepted, its filler published first and playing."""

    baton: FakeBaton
    link: BatonLink
    source: FakeAudioSource


@contextlib.asynccontextmanager
async def handed_off(reason: str = "a") -> AsyncIterator[HandedOff]:
    net = Net()
    baton = FakeBaton(net)
    _room, session, link, agent, source = await linked(net)
    assert link.filler is not None and source is not None
    await published_first(link)
    await link.handoff("billing", reason=reason, agent=agent)
    try:
        yield HandedOff(baton, link, source)
    finally:
        await link.aclose()
        await session.aclose()


def test_handoff_announces_the_filler_it_started_and_filler_stop_fades_it() -> None:
    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        room, session, link, agent, source = await linked(net)
        assert link.filler is not None and source is not None
        await published_first(link)
        ticket = await link.handoff("billing", reason="disputed charge", agent=agent)
        assert ticket.handoff_id == "h-1"
        await asyncio.sleep(0.01)
        (request,) = requests(baton)
        assert request["filler"] is True and request["quiet"] is True, request
        assert link.filler.playing, "it plays on after handoff() returned"
        await asyncio.sleep(2.0)
        assert link.filler.playing and not silent(source.frames[-10:])
        n = len(source.frames)
        baton.send("agent-triage", "filler_stop", handoff="h-1", fade_ms=1000)
        await asyncio.sleep(3.0)
        assert link.filler.stopped_by == "filler_stop" and link.filler.mode == "idle"
        assert 50 <= len(source.frames) - n <= 51, len(source.frames) - n
        await link.aclose()
        assert room.tracks == {}, "unpublished at close"
        await session.aclose()

    run_virtual(main)


def test_a_filler_stop_for_an_earlier_handoff_is_ignored_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A late stop from an earlier handoff (sent after this one was accepted) must not end this
    one's filler: if baton then died, the caller would hear silence."""

    async def main() -> None:
        async with handed_off(reason="disputed charge") as h:
            baton, link = h.baton, h.link
            await asyncio.sleep(0.5)
            baton.send("agent-triage", "filler_stop", handoff="h-0", fade_ms=0)
            await asyncio.sleep(0.1)
            assert link.filler.mode == "playing", link.filler.stopped_by
            baton.send("agent-triage", "filler_stop", handoff="h-1", fade_ms=0)
            await asyncio.sleep(0.1)
            assert link.filler.mode == "idle" and link.filler.stopped_by == "filler_stop"

    with caplog.at_level(logging.INFO, logger="lk_baton.agents"):
        run_virtual(main)
    assert "filler_stop for 'h-0' ignored: the filler plays for 'h-1'" in caplog.text


def test_deactivate_standby_stops_the_filler() -> None:
    """A baton that came back after a crash gave the floor to our target and tells us to
    stand by: no filler_stop will come, so the filler stops now."""

    async def main() -> None:
        async with handed_off() as h:
            baton, link = h.baton, h.link
            await asyncio.sleep(0.5)
            assert link.filler.mode == "playing", (
                "the deactivate (handoff) after the accept leaves it"
            )
            baton.send("agent-triage", "deactivate", reason="standby")
            await asyncio.sleep(0.5)
            assert link.filler.mode == "idle" and link.filler.stopped_by == "deactivated"

    run_virtual(main)


def test_no_filler_field_when_the_track_is_not_published_by_the_end_of_the_sentence() -> None:
    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        room, session, link, agent, source = await linked(net)
        assert link.filler is not None and source is not None
        room.publish_delay = 0.2  # first handoff, and no sentence to wait for
        await link.handoff("billing", reason="a", agent=agent)
        await asyncio.sleep(1.0)
        assert "filler" not in requests(baton)[0]
        assert link.filler.published, "published meanwhile, for the next handoff"
        assert source.frames == [], "not played, nor its pre-roll"
        await link.aclose()
        await session.aclose()

    run_virtual(main)


def test_handoff_with_filler_false_publishes_and_plays_nothing() -> None:
    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        room, session, link, agent, source = await linked(net)
        assert link.filler is not None and source is not None
        await link.handoff("billing", reason="a", agent=agent, filler=False)
        await asyncio.sleep(1.0)
        assert "filler" not in requests(baton)[0]
        assert room.tracks == {} and source.frames == [] and not link.filler.published
        await link.aclose()
        await session.aclose()

    run_virtual(main)


def test_source_filler_false_turns_it_off() -> None:
    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        room, session, link, agent, _ = await linked(net, source_filler=False)
        assert link.filler is None
        await link.handoff("billing", reason="a", agent=agent)
        await asyncio.sleep(0.5)
        assert "filler" not in requests(baton)[0] and room.tracks == {}
        await link.aclose()
        await session.aclose()

    run_virtual(main)


@pytest.mark.parametrize("answer", ["refused", "timeout"])
def test_a_refused_or_timed_out_request_fades_the_filler(answer: str) -> None:
    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        if answer == "refused":
            baton.refuse = "unknown_target"
        else:
            baton.silent = True
        _room, session, link, agent, source = await linked(net)
        assert link.filler is not None and source is not None
        await published_first(link)
        with pytest.raises(HandoffRefused) as e:
            await link.handoff("billing", reason="a", agent=agent, timeout=0.5)
        assert e.value.reason == ("unknown_target" if answer == "refused" else "timeout")
        assert requests(baton)[0]["filler"] is True
        assert link.filler.stopped_by == "not_accepted"
        n = len(source.frames)
        await asyncio.sleep(2.0)
        assert len(source.frames) - n <= FADE_FRAMES and link.filler.mode == "idle"
        await link.aclose()
        await session.aclose()

    run_virtual(main)


def test_an_error_before_the_request_is_accepted_fades_the_filler() -> None:
    async def main() -> None:
        net = Net()
        FakeBaton(net)
        _room, session, link, agent, source = await linked(net)
        assert link.filler is not None and source is not None
        await published_first(link)

        async def broken(timeout: float) -> None:
            raise RuntimeError("session gone")

        link._wait_not_speaking = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await link.handoff("billing", reason="a", agent=agent)
        assert link.filler.mode == "idle", "the pre-roll ended"
        n = len(source.frames)
        await asyncio.sleep(1.0)
        assert len(source.frames) == n
        await link.aclose()
        await session.aclose()

    run_virtual(main)


def test_a_handoff_cancelled_while_waiting_for_the_answer_fades_the_filler() -> None:
    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        baton.silent = True
        _room, session, link, agent, source = await linked(net)
        assert link.filler is not None and source is not None
        await published_first(link)
        task = asyncio.ensure_future(link.handoff("billing", reason="a", agent=agent))
        await asyncio.sleep(0.5)
        assert link.filler.playing and requests(baton)[0]["filler"] is True
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert link.filler.stopped_by == "not_accepted"
        await asyncio.sleep(1.0)
        assert link.filler.mode == "idle"
        await link.aclose()
        await session.aclose()

    run_virtual(main)


class OneAtATimeBaton(FakeBaton):
    """Waits for two handoff requests, then accepts the one sent first (the in-memory network
    may deliver packets of one instant out of order) and refuses the other
    (``handoff_in_progress``)."""

    def on_control(self, who: str, msg: dict[str, Any]) -> None:
        if msg["type"] != "handoff":
            super().on_control(who, msg)
            return
        self.got.append((who, msg))
        both = requests(self)
        if len(both) < 2:
            return
        first, second = sorted(both, key=lambda m: int(m["id"].rsplit("-", 1)[1]))
        self.send(who, "handoff_accepted", re=first["id"], handoff="h-1", target="billing")
        self.send(who, "handoff_refused", re=second["id"], reason="handoff_in_progress")


def test_a_second_concurrent_handoff_leaves_the_first_ones_filler_alone() -> None:
    """The model called the transfer tool twice: the second request, refused, must not stop
    the filler the first (accepted) one started."""

    async def main() -> None:
        net = Net()
        baton = OneAtATimeBaton(net)
        _room, session, link, agent, source = await linked(net)
        assert link.filler is not None and source is not None
        await published_first(link)
        first = asyncio.ensure_future(link.handoff("billing", reason="a", agent=agent))
        second = asyncio.ensure_future(link.handoff("billing", reason="a", agent=agent))
        ticket = await first
        with pytest.raises(HandoffRefused):
            await second
        assert ticket.handoff_id == "h-1"
        one, two = sorted(requests(baton), key=lambda m: int(m["id"].rsplit("-", 1)[1]))
        assert one["filler"] is True and "filler" not in two
        await asyncio.sleep(1.0)
        assert link.filler.playing and link.filler.stopped_by is None
        await link.aclose()
        await session.aclose()

    run_virtual(main)


def test_activate_after_the_handoff_holds_the_filler_at_most_1_2_s() -> None:
    """A handback: baton gives the floor back; the filler covers until this agent speaks (here
    it never does: the cap)."""

    async def main() -> None:
        async with handed_off() as h:
            baton, link, source = h.baton, h.link, h.source
            await asyncio.sleep(3.0)
            assert link.filler.playing
            baton.send(
                "agent-triage", "handoff_failed", handoff="h-1", target="billing", reason="x"
            )
            baton.send("agent-triage", "activate", handoff="h-1", cause="handback", reason="x")
            await asyncio.sleep(0.01)
            n = len(source.frames)
            await asyncio.sleep(3.0)
            assert link.floor.active and link.filler.stopped_by == "hold_limit"
            held = len(source.frames) - n
            assert abs(held - (60 + FADE_FRAMES)) <= 1, held

    run_virtual(main)


def test_release_holds_the_filler_at_most_1_2_s_more() -> None:
    """The target took over (``release``) and baton died before its ``filler_stop``: the
    source's filler may not run on under the target's voice."""

    async def main() -> None:
        async with handed_off() as h:
            baton, link, source = h.baton, h.link, h.source
            await asyncio.sleep(1.0)
            baton.send("agent-triage", "release", handoff="h-1", mode="standby")
            await asyncio.sleep(0.01)
            n = len(source.frames)
            await asyncio.sleep(3.0)
            assert link.filler.stopped_by == "hold_limit" and link.filler.mode == "idle"
            held = len(source.frames) - n
            assert abs(held - (60 + FADE_FRAMES)) <= 1, held

    run_virtual(main)


def test_without_filler_stop_the_filler_ends_at_its_bound() -> None:
    """baton died after accepting: the caller hears the filler, not silence, then it ends."""

    async def main() -> None:
        async with handed_off() as h:
            link = h.link
            await asyncio.sleep(19.0)
            assert link.filler.playing
            await asyncio.sleep(3.0)
            assert link.filler.stopped_by == "max" and link.filler.mode == "idle"

    run_virtual(main)


def test_default_wiring_publishes_a_real_track_and_announces_the_filler() -> None:
    """Real time, real ``rtc.AudioSource`` and ``rtc.LocalAudioTrack`` (no server: the fake
    room takes the publication)."""

    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        room, session, link, agent, _ = await linked(net, fake=False)
        assert link.filler is not None
        await published_first(link)
        (pub,) = room.tracks.values()
        assert isinstance(pub.track, rtc.LocalAudioTrack) and pub.track.name == "baton-filler"
        await link.handoff("billing", reason="a", agent=agent)
        await asyncio.sleep(0.2)
        assert requests(baton)[0]["filler"] is True
        assert link.filler.playing and link.filler.frames_sent >= 5
        baton.send("agent-triage", "filler_stop", handoff="h-1", fade_ms=0)
        await asyncio.sleep(0.1)
        assert link.filler.mode == "idle"
        await session.aclose()  # the session's close takes the filler down too
        await asyncio.sleep(0.1)
        assert room.tracks == {}
        await link.aclose()

    asyncio.run(main())


# -- starting before the voice ends (agents.start_before_the_end) --


class _Queue:
    """A voice's queued seconds as successive reads see them."""

    def __init__(self, reads: list[float]) -> None:
        self.reads = reads
        self.n = 0

    @property
    def queued_duration(self) -> float:
        v = self.reads[min(self.n, len(self.reads) - 1)]
        self.n += 1
        return v


class _StartRecorder:
    def __init__(self) -> None:
        self.started_at_read: int | None = None
        self.queue: _Queue | None = None

    def start(self) -> bool:
        assert self.queue is not None
        self.started_at_read = self.queue.n
        return True


def test_voice_queue_is_read_from_the_audio_source_at_the_end_of_the_output_chain() -> None:
    from lk_baton.agents import voice_queue

    class Out:
        def __init__(self, nxt: object = None, source: object = None) -> None:
            self.next_in_chain = nxt
            self._audio_source = source

    class Session:
        def __init__(self, audio: object) -> None:
            self.output = type("O", (), {"audio": audio})()

    q = _Queue([0.12])
    read = voice_queue(Session(Out(Out(Out(source=q)))))  # type: ignore[arg-type]
    assert read is not None and read() == 0.12
    assert voice_queue(Session(Out(Out()))) is None  # type: ignore[arg-type]
    assert voice_queue(Session(None)) is None  # type: ignore[arg-type]


def test_the_filler_starts_with_at_most_the_lead_left_not_before_the_sentence_began() -> None:
    from lk_baton.agents import FILLER_LEAD_S, start_before_the_end

    # the tool runs before the sentence's audio is queued (0), then it plays and drains
    reads = [0.0, 0.0, 0.0, 0.2, 0.15, 0.1, 0.06, FILLER_LEAD_S - 0.01, 0.0]
    q = _Queue(reads)
    rec = _StartRecorder()
    rec.queue = q
    filler: Any = rec
    started = asyncio.run(start_before_the_end(filler, lambda: q.queued_duration))
    assert started
    assert rec.started_at_read == reads.index(FILLER_LEAD_S - 0.01) + 1, (
        "at the first read within the lead"
    )
