"""`baton join` against a real LiveKit server, with real SDK participants as peers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import uuid
import wave
from pathlib import Path

import numpy as np
import pytest
from harness import (
    API_KEY,
    API_SECRET,
    BATON_BIN,
    LiveKitServer,
    baton_join,
    free_port,
    joined_baton,
    livekit_server,
    run,
    wait_until,
)
from livekit import api, rtc
from peers import Peer, record, window_levels


def room_name() -> str:
    return f"r-{uuid.uuid4().hex[:8]}"


def test_ping_gets_pong_addressed_only_to_sender(server: LiveKitServer) -> None:
    room = room_name()
    with joined_baton(server, room):

        async def scenario() -> None:
            alice = await Peer.join(server, room, "alice")
            bob = await Peer.join(server, room, "bob")
            await alice.wait_participant("baton")
            # The first ping may wait (up to 5 s) for the server to announce alice to baton;
            # the round trip is measured on the next one.
            await alice.ping(timeout=8)
            pong, rtt = await alice.ping()
            assert pong["type"] == "pong" and pong["v"] == 1
            assert isinstance(pong["id"], str) and pong["id"]
            assert rtt < 2.0
            # bob was in the room all along and must not have seen alice's pong.
            await asyncio.sleep(0.3)
            assert all(m.topic != "baton.control" for m in list(bob.inbox._queue)), "pong leaked to bob"  # type: ignore[attr-defined]
            await alice.close()
            await bob.close()

        run(scenario())


def test_bad_control_input_is_ignored_and_unknown_version_answered(server: LiveKitServer) -> None:
    room = room_name()
    with joined_baton(server, room) as baton:

        async def scenario() -> None:
            alice = await Peer.join(server, room, "alice", kind="agent")
            await alice.wait_participant("baton")
            for junk in [b"\x00\xff not json", b"[]", b'{"v":1}', b'{"v":1,"type":"dance","id":"d1"}', b"{" * 14000]:
                await alice.send("baton.control", junk, ["baton"])
            await alice.send("baton.control", json.dumps({"v": 9, "type": "ping", "id": "v9"}).encode(), ["baton"])
            err = json.loads((await alice.next("baton.control")).data)
            assert err["type"] == "error" and err["code"] == "unsupported_version" and err["re"] == "v9"
            pong, _ = await alice.ping()  # still alive and answering
            assert pong["type"] == "pong"
            await alice.close()

        run(scenario())
        baton.wait_for("rejected control message: malformed")
        baton.wait_for("unknown type `dance`")


def test_caller_junk_gets_no_reply_and_rate_limited_logs_with_counts(server: LiveKitServer) -> None:
    """Issue 11, item 9: a caller's client (not an agent) sends 300 junk control packets and a
    message of an unsupported version. baton sends it nothing but the answer to its `ping` (a
    liveness probe anyone may use), writes a handful of security lines instead of 300, and
    later one line that counts the rest."""
    room = room_name()
    with joined_baton(server, room) as baton:

        async def scenario() -> None:
            caller = await Peer.join(server, room, "caller")
            await caller.wait_participant("baton")
            pong, _ = await caller.ping()  # announced to baton, and a probe is answered
            assert pong["type"] == "pong"
            await caller.send("baton.control", json.dumps({"v": 9, "type": "ping", "id": "v9"}).encode(), ["baton"])
            forged = {"v": 1, "type": "hello", "id": "h-1", "agent_name": "triage"}
            await caller.send("baton.control", json.dumps(forged).encode(), ["baton"])
            for _ in range(300):
                await caller.send("baton.control", b"\x00junk", ["baton"])
            await caller.send("baton.control", json.dumps({"v": 1, "type": "ping", "id": "last"}).encode(), ["baton"])
            # Everything before the last ping was handled before it (one reliable stream): the
            # only answer is that pong.
            got = json.loads((await caller.next("baton.control")).data)
            assert got["type"] == "pong" and got["re"] == "last", got
            await asyncio.sleep(0.5)
            assert caller.inbox.empty(), "baton answered the caller's junk"
            # The count comes in the next summary (every 10 s); the call goes on meanwhile.
            await asyncio.to_thread(baton.wait_for, r"security: \d+ more like this were not logged.*caller", 25)
            await caller.close()

        run(scenario())
        malformed = "security: rejected control message: malformed"
        junk = [ln for _, ln in baton.lines if malformed in ln and "caller" in ln and "more like this" not in ln]
        assert 1 <= len(junk) <= 5, "\n".join(junk)
        assert any("control message ignored" in ln and "caller" in ln and "hello" in ln for _, ln in baton.lines)
        counted = [int(m) for m in re.findall(r"security: (\d+) more like this were not logged", baton.text())]
        assert sum(counted) >= 300 - len(junk), (counted, baton.text())


def test_15000_byte_packets_byte_exact_both_ways_and_misaddressed_unseen(server: LiveKitServer) -> None:
    room = room_name()
    with joined_baton(server, room, "--echo"):

        async def scenario() -> None:
            alice = await Peer.join(server, room, "alice")
            bob = await Peer.join(server, room, "bob")
            await alice.wait_participant("baton")
            # Addressed to bob: the server must not hand it to baton, so no echo comes back.
            stray = os.urandom(15000)
            await alice.send("baton.echo", stray, ["bob"])
            got = await bob.next("baton.echo")
            assert got.data == stray and got.sender == "alice"
            for _ in range(3):
                payload = os.urandom(15000)
                await alice.send("baton.echo", payload, ["baton"])
                echo = await alice.next("baton.echo")
                assert echo.sender == "baton"
                assert echo.data == payload, "echo differs from what was sent"
            assert alice.inbox.empty(), "baton answered a packet that was not addressed to it"
            await alice.close()
            await bob.close()

        run(scenario())


async def baton_publication(caller: Peer) -> rtc.RemoteTrackPublication:
    """baton's track publication (it has one) as `caller` sees it, once there (at most 10 s)."""
    p = await caller.wait_participant("baton")
    await wait_until(lambda: bool(p.track_publications), 10, "baton published no track")
    return next(iter(p.track_publications.values()))


def _baton_audio(server: LiveKitServer, room: str, seconds: float) -> tuple[bool, np.ndarray]:
    async def scenario() -> tuple[bool, np.ndarray]:
        caller = await Peer.join(server, room, "caller")
        pub = await baton_publication(caller)
        await wait_until(lambda: pub.track is not None, 10, "baton's track was never subscribed")
        assert pub.track is not None
        assert pub.kind == rtc.TrackKind.KIND_AUDIO
        muted = pub.muted
        pcm = await record(pub.track, seconds)
        await caller.close()
        return muted, pcm

    return run(scenario())  # type: ignore[return-value]


def test_unmuted_track_plays_comfort_noise_without_gaps(server: LiveKitServer) -> None:
    room = room_name()
    with joined_baton(server, room, "--unmuted", ready="filler track published"):
        muted, pcm = _baton_audio(server, room, 3.0)
        levels = window_levels(pcm)
        assert not muted
        # Skip the receiver's first 300 ms of start-up; after that, every 20 ms window must carry
        # the comfort noise (about -45 dBFS). A lost or late packet would show as a window that
        # decays toward silence.
        steady = levels[15:]
        assert len(steady) > 100
        quiet = [(i, round(lv, 1)) for i, lv in enumerate(steady) if lv < -60]
        assert not quiet, f"silent windows in baton's audio: {quiet[:10]}"
        assert max(steady) < -30, "comfort noise is louder than it should be"


def test_filler_clip_is_looped_seamlessly_at_its_gain(server: LiveKitServer, tmp_path: Path) -> None:
    # A 0.9 s stereo 16 kHz clip of a 1 kHz tone at -20 dBFS RMS: another rate and channel count
    # than Opus wants, short enough that a 3 s recording crosses the loop's wrap three times.
    rate, secs, freq = 16000, 0.9, 1000.0
    t = np.arange(int(rate * secs)) / rate
    tone = (np.sin(2 * np.pi * freq * t) * 0.1 * np.sqrt(2) * 32767).astype(np.int16)
    clip = tmp_path / "hold.wav"
    with wave.open(str(clip), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(tone, 2).tobytes())
    room = room_name()
    args = ("--unmuted", "--filler-clip", str(clip), "--filler-gain-db", "-6")
    with joined_baton(server, room, *args, ready="filler track published") as baton:
        baton.wait_for(r"filler ready.*hold\.wav")
        _, pcm = _baton_audio(server, room, 3.0)
    steady = pcm[48000 * 3 // 10 :]  # past the receiver's start-up
    levels = window_levels(steady)
    assert len(levels) > 100
    # Every 20 ms window, wraps included, carries the clip at -20 - 6 dB (Opus: within 3 dB).
    off = [(i, round(lv, 1)) for i, lv in enumerate(levels) if abs(lv + 26) > 3]
    assert not off, f"windows off the clip's level: {off[:10]}"
    # And it is the clip, not noise: the spectrum peaks at the tone.
    spectrum = np.abs(np.fft.rfft(steady.astype(np.float64)))
    peak = np.argmax(spectrum) * 48000 / steady.size
    assert abs(peak - freq) < 10, f"spectral peak at {peak:.0f} Hz"


def test_bad_filler_clip_is_a_clear_start_error(server: LiveKitServer, tmp_path: Path) -> None:
    bad = tmp_path / "not-a.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    p = subprocess.run(
        [str(BATON_BIN), "join", "--url", server.url, "--api-key", API_KEY, "--api-secret", API_SECRET,
         "--room", room_name(), "--filler-clip", str(bad)],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert p.returncode == 1
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("baton: error:")]
    assert len(errors) == 1 and "filler clip" in errors[0] and "not-a.wav" in errors[0], p.stderr


def test_track_starts_muted_and_follows_server_side_mute(server: LiveKitServer) -> None:
    room = room_name()
    with joined_baton(server, room, ready="filler track published") as baton:

        async def scenario() -> None:
            caller = await Peer.join(server, room, "caller")
            pub = await baton_publication(caller)
            assert pub.muted, "baton's track should start muted"

            # An admin unmutes it through RoomService (configs/livekit.yaml allows remote unmute),
            # then mutes it again; baton follows and every subscriber sees it.
            async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
                await lk.room.mute_published_track(
                    api.MuteRoomTrackRequest(room=room, identity="baton", track_sid=pub.sid, muted=False)
                )
                await wait_until(lambda: not pub.muted, 10, "the server's unmute never reached the caller")
                await lk.room.mute_published_track(
                    api.MuteRoomTrackRequest(room=room, identity="baton", track_sid=pub.sid, muted=True)
                )
                await wait_until(lambda: pub.muted, 10, "the server's mute never reached the caller")
            await caller.close()

        run(scenario())
        baton.wait_for("server changed the filler track's mute")


def test_sigterm_leaves_cleanly(server: LiveKitServer) -> None:
    room = room_name()
    baton = baton_join(server, room)
    baton.wait_for("joined: data channel open")

    async def scenario() -> float:
        caller = await Peer.join(server, room, "caller")
        await caller.wait_participant("baton")
        left = asyncio.Event()
        caller.room.on("participant_disconnected", lambda p: left.set() if p.identity == "baton" else None)
        t0 = time.monotonic()
        baton.proc.terminate()
        await asyncio.wait_for(left.wait(), 5)
        took = time.monotonic() - t0
        await caller.close()
        return took

    took = run(scenario())
    assert baton.stop() == 0
    assert took < 2.0, f"baton took {took:.2f}s to leave"  # type: ignore[operator]
    baton.wait_for("leaving")


def test_sigterm_leaves_even_when_nobody_reads_the_logs(server: LiveKitServer) -> None:
    """A log collector that died leaves baton writing into a closed pipe (EPIPE on every line);
    SIGTERM must still end it, promptly and with exit 0."""
    env = dict(os.environ, LIVEKIT_URL=server.url, LIVEKIT_API_KEY=API_KEY, LIVEKIT_API_SECRET=API_SECRET)
    r, w = os.pipe()
    proc = subprocess.Popen([str(BATON_BIN), "join", "--room", room_name()], env=env, stdout=w, stderr=w)
    os.close(w)
    try:
        seen = b""
        deadline = time.monotonic() + 20
        while b"data channel open" not in seen and time.monotonic() < deadline:
            seen += os.read(r, 65536)
        assert b"data channel open" in seen, seen.decode(errors="replace")
    finally:
        os.close(r)  # nobody reads baton's stdout and stderr from here on
    time.sleep(0.5)
    proc.terminate()
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("baton did not exit within 10 s of SIGTERM with its log pipe closed") from None
    assert code == 0


def join_error(url: str, api_secret: str) -> str:
    """Runs `baton join` against `url`, which must fail within 5 s with one `baton: error:` line;
    returns that line."""
    t0 = time.monotonic()
    out = subprocess.run(
        [str(BATON_BIN), "join", "--room", "x", "--url", url, "--api-key", API_KEY, "--api-secret", api_secret],
        capture_output=True,
        text=True,
        timeout=10,
    )
    took = time.monotonic() - t0
    assert out.returncode != 0
    assert took < 5.0, f"took {took:.1f}s"
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("baton: error:")]
    assert len(errors) == 1, out.stderr
    return errors[0]


def test_bad_credentials_fail_fast_with_one_line() -> None:
    with livekit_server() as srv:
        error = join_error(srv.url, "wrong-secret-wrong-secret-wrong-secret")
    assert "credentials" in error or "401" in error, error


@pytest.mark.parametrize("url", ["ws://127.0.0.1:{port}", "ws://no-such-host.invalid:7880"])
def test_unreachable_server_fails_fast_with_one_line(url: str) -> None:
    error = join_error(url.format(port=free_port()), API_SECRET)
    assert "could not reach" in error, error


# The restarted server binds the same ports; they lie outside the ephemeral range (harness
# free_port), so baton's new ICE sockets cannot take one meanwhile (as happened once in CI).
def test_back_in_room_after_server_restart() -> None:
    srv = LiveKitServer()
    srv.start()
    room = room_name()
    with joined_baton(srv, room) as baton:
        mark = len(baton.lines)
        srv.kill()
        t0 = time.monotonic()
        time.sleep(0.5)
        srv.start()

        async def scenario() -> float:
            alice = await Peer.join(srv, room, "alice")
            loop = asyncio.get_running_loop()
            while True:
                try:
                    await alice.wait_participant("baton", timeout=1)
                    pong, _ = await alice.ping(timeout=1)
                    assert pong["type"] == "pong"
                    break
                except TimeoutError:
                    if time.monotonic() - t0 > 10:
                        raise
            took = time.monotonic() - t0
            await alice.close()
            del loop
            return took

        took = run(scenario())
        assert took < 10.0, f"baton answered ping {took:.1f}s after the restart"  # type: ignore[operator]
        baton.wait_for("rejoined", start=mark)
        srv.stop()


def test_resume_after_signal_drop(server: LiveKitServer) -> None:
    """SIGUSR1 makes baton drop its signal websocket as a network blip would; it must resume
    the same session (no rejoin) and keep answering."""
    room = room_name()
    with joined_baton(server, room) as baton:

        async def scenario() -> None:
            alice = await Peer.join(server, room, "alice")
            await alice.wait_participant("baton")
            await alice.ping()
            mark = len(baton.lines)
            baton.proc.send_signal(10)  # SIGUSR1
            baton.wait_for("resumed", start=mark)
            pong, _ = await alice.ping()
            assert pong["type"] == "pong"
            assert "rejoined" not in "\n".join(line for _, line in baton.lines[mark:])
            await alice.close()

        run(scenario())
