"""The source filler: the handing-off agent's own comfort noise, on a track of its own.

When agent A hands the call to agent B, baton plays a filler (quiet comfort noise) on its own
track from the moment A is quiet until B is heard. That filler reaches the caller one network
hop after A's last word (35 to 80 ms of dead air first), and not at all if baton's process dies
mid-handoff. So A also plays a filler itself, on a second audio track named
:data:`~lk_baton.floor.FILLER_TRACK_NAME` (``baton-filler``), from the end of its sentence
(just under its last syllable, see ``lk_baton.agents.start_before_the_end``) until baton says
``filler_stop``. Both fillers are the same quiet noise and
overlap; the caller hears an open line instead of a gap.

:class:`SourceFiller` owns that track. Its life in one handoff (driven by
:meth:`lk_baton.agents.BatonLink.handoff`)::

    arm()      publish the track if needed (in the background), then stream digital silence
               (the pre-roll: the caller subscribes and decodes before the noise starts)
    start()    the sentence is ending (40 ms of its voice left to send, or played out):
               comfort noise, fading in over 40 ms from -3 dB
    stop(ms)   filler_stop (fade_ms), a refused or timed-out request (250 ms): fade to
               silence, then stream nothing
    hold_until_speaking(1.2)
               activate (a handback): play until this agent speaks, or 1.2 s, then fade 250 ms;
               release (the target has the floor): at most 1.2 s more
    stop(250)  deactivate other than the handoff's (told to stand by: no filler_stop will come)

and it never plays longer than ``max_s`` (20 s, baton's ``max_filler``) in one go. Between
handoffs it streams nothing, so it costs no CPU.

Timing is counted in 20 ms frames of audio, not read from a clock: ``capture_frame`` of
``rtc.AudioSource`` blocks while its queue (100 ms here) is full, so frames leave at real time
and a count of frames is the time the caller heard. Nothing here raises into the caller on a
room error: failures are logged and the filler carries on or goes silent.

``livekit.rtc`` and numpy (a dependency of ``livekit``) are imported on first use, so importing
:mod:`lk_baton` still loads neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .floor import FILLER_TRACK_NAME, MAX_FILLER_FADE_MS

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from livekit import rtc

__all__ = [
    "FILLER_FRAME_MS",
    "FILLER_HOLD_S",
    "FILLER_MAX_S",
    "FILLER_NOISE_DBFS",
    "FILLER_SAMPLE_RATE",
    "FILLER_STOP_FADE_MS",
    "FillerMode",
    "FillerSink",
    "SourceFiller",
    "comfort_noise_loop",
]

log = logging.getLogger("lk_baton.filler")

FILLER_SAMPLE_RATE = 48_000
"""Samples per second of the filler track (mono)."""
FILLER_FRAME_MS = 20
"""Milliseconds of audio per frame handed to the audio source."""
FRAME_SAMPLES = FILLER_SAMPLE_RATE * FILLER_FRAME_MS // 1000
FILLER_NOISE_DBFS = -45.0
"""RMS level of the comfort noise in dBFS (full scale 32767), baton's default ``noise_dbfs``:
the sound of an open line, well under any voice."""
LOOP_S = 3.0
"""Seconds of the noise loop. Long enough that the repetition is not heard, short enough to
compute once per process (a few milliseconds)."""
FADE_IN_MS = 40
"""The fade-in, as baton's: short, since a long ramp from near silence would itself sound like
the gap the filler exists to cover."""
FADE_IN_FROM_DB = -3.0
"""Where the fade-in starts, as baton's: softens the onset without sinking the first frames
toward a dead line."""
FILLER_STOP_FADE_MS = 250
"""The fade when the adapter stops the filler itself (refused or timed-out request, the hold
after ``activate`` ran out or heard the agent, the ``max_s`` bound): baton's ``filler_fade``."""
FILLER_HOLD_S = 1.2
"""After ``activate``: the longest the filler waits for this agent to speak (baton's
``filler_hold``)."""
FILLER_MAX_S = 20.0
"""The longest the filler plays in one go (baton's ``max_filler``): past it the handoff has
gone wrong and baton (if alive) has decided what happens; a filler with no end would be worse
than silence."""
QUEUE_MS = 100
"""The audio source's queue. ``capture_frame`` blocks while it is full, which paces the frames;
a stop is heard at most this much later (the frames already queued), and at the start the
queued pre-roll silence is dropped so the noise is not delayed by it."""
_SILENCE = bytes(2 * FRAME_SAMPLES)
_NOISE_SEED = 0x5EED
_LOW_CUT_HZ = 50.0

FillerMode = Literal["idle", "armed", "playing", "fading"]
"""``idle``: nothing streamed. ``armed``: the pre-roll, digital silence until
:meth:`SourceFiller.start`. ``playing``: comfort noise. ``fading``: comfort noise fading to
silence, then idle."""


class FillerSink(Protocol):
    """Where :class:`SourceFiller` puts its frames: ``livekit.rtc.AudioSource`` (the default),
    or a stand-in in tests. ``capture_frame`` must block while the sink's queue is full: that is
    what paces the filler."""

    async def capture_frame(self, frame: rtc.AudioFrame) -> None: ...

    def clear_queue(self) -> None: ...

    async def aclose(self) -> None: ...


@functools.cache
def comfort_noise_loop(
    noise_dbfs: float = FILLER_NOISE_DBFS, seconds: float = LOOP_S
) -> npt.NDArray[np.int16]:
    """``seconds`` of pink comfort noise at ``noise_dbfs`` RMS (dBFS, full scale 32767) as mono
    int16 samples at 48 kHz, computed once per process for each set of arguments (read-only).

    Pink (-3 dB per octave) sounds far softer than white noise at the same level; nothing under
    50 Hz (rumble a phone line does not carry, and which would eat the level). The spectrum is
    shaped in one FFT, so the loop is periodic: it wraps without a click. Deterministic."""
    import numpy as np

    n = round(seconds * FILLER_SAMPLE_RATE)
    if n <= 0:
        raise ValueError("seconds must be positive")
    rng = np.random.default_rng(_NOISE_SEED)
    bins = n // 2 + 1
    spectrum = rng.standard_normal(bins) + 1j * rng.standard_normal(bins)
    freqs = np.fft.rfftfreq(n, 1.0 / FILLER_SAMPLE_RATE)
    shape = np.zeros(bins)
    audible = freqs >= _LOW_CUT_HZ
    shape[audible] = 1.0 / np.sqrt(freqs[audible])
    noise = np.fft.irfft(spectrum * shape, n)
    rms = float(np.sqrt(np.mean(noise**2)))
    target = 10.0 ** (noise_dbfs / 20.0) * 32767.0
    scaled: npt.NDArray[np.float64] = np.clip(np.round(noise * (target / rms)), -32768, 32767)
    pcm: npt.NDArray[np.int16] = scaled.astype(np.int16)
    pcm.flags.writeable = False
    return pcm


def _frames(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000 / FILLER_FRAME_MS - 1e-9))


class SourceFiller:
    """The source filler of one agent in one room: a ``baton-filler`` audio track (48 kHz mono,
    20 ms frames, ``TrackSource.SOURCE_UNKNOWN`` so no one takes it for a microphone) and the
    comfort noise played on it. See the module's docstring for its life in a handoff.

    ``speaking()``: whether this agent is speaking now (its session's ``agent_state`` is
    ``speaking``), read once per frame while :meth:`hold_until_speaking` holds. ``noise_dbfs``:
    the noise's RMS level. ``max_s``: the longest it plays in one go (the pre-roll has the same
    bound). ``source`` and ``track``: an audio sink and the track to publish, instead of an
    ``rtc.AudioSource`` (queue ``queue_ms``) and an ``rtc.LocalAudioTrack`` made on first
    :meth:`publish` (for tests, or a custom pipeline); a given ``source`` is not closed here.

    Every method is safe to call in any state, returns at once (but :meth:`publish` and
    :meth:`aclose`) and never raises on a room error. Needs a running event loop.
    """

    def __init__(
        self,
        room: rtc.Room,
        *,
        speaking: Callable[[], bool] | None = None,
        noise_dbfs: float = FILLER_NOISE_DBFS,
        max_s: float = FILLER_MAX_S,
        queue_ms: int = QUEUE_MS,
        source: FillerSink | None = None,
        track: rtc.LocalTrack | None = None,
    ) -> None:
        self.room = room
        self.noise_dbfs = noise_dbfs
        # The noise loop (numpy's import and an FFT: 70-530 ms in a fresh process here) is made
        # now, in a thread, not by the first noise frame on the agent's event loop: there it
        # blocked the loop at the end of the transfer sentence, the playout's end went
        # unnoticed and neither filler played (gaps of 360-720 ms in a new job process,
        # livekit-agents' default executor; docs/BENCHMARKS.md 4.2). Cached per process.
        threading.Thread(
            target=comfort_noise_loop, args=(noise_dbfs,), name="lk-baton-noise", daemon=True
        ).start()
        self.max_s = max_s
        self.queue_ms = queue_ms
        self._speaking = speaking
        self._source: FillerSink | None = source
        self._own_source = source is None
        self._track = track
        self._sid: str | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._publishing: asyncio.Task[bool] | None = None
        self._stream: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._mode: FillerMode = "idle"
        self._cut = False  # stopped at once: drop what the sink holds once its capture returns
        self._pos = 0  # next sample of the noise loop
        self._played = 0  # noise frames since start()
        self._preroll = 0  # silence frames since arm()
        self._gain = 0.0  # gain at the end of the last noise frame
        self._ramp_from_db = FADE_IN_FROM_DB
        self._ramp_at = 0  # samples of the fade-in done
        self._ramp_len = FILLER_SAMPLE_RATE * FADE_IN_MS // 1000
        self._fade_from = 1.0
        self._fade_at = 0  # samples of the fade-out done
        self._fade_len = 0
        self._hold_until: int | None = None  # the frame at which the hold gives up
        self.frames_sent = 0
        """Frames captured into the sink since creation (silence and noise)."""
        self.stopped_by: str | None = None
        """Why the filler last stopped or began to fade (``filler_stop``, ``heard``,
        ``hold_limit``, ``max``, ``not_accepted``, ``closed``...), for logs and tests."""

    # -- state --

    @property
    def published(self) -> bool:
        """Whether the track is published in the room (it stays published between handoffs)."""
        return self._sid is not None

    @property
    def mode(self) -> FillerMode:
        """What is streamed now (see :data:`FillerMode`)."""
        return self._mode

    @property
    def playing(self) -> bool:
        """Whether comfort noise is being streamed (playing or fading out)."""
        return self._mode in ("playing", "fading")

    # -- publication --

    async def publish(self) -> bool:
        """Publish the track once per room (later calls return at once); True when it is
        published. A failure is logged, returns False, and the next call tries again."""
        if self._sid is not None:
            return True
        if self._closed:
            return False
        task = self._publishing
        if task is None or (task.done() and (task.cancelled() or not task.result())):
            task = self._publishing = self._spawn(self._publish())
        # shielded: a caller that gives up does not cancel a publication another one awaits
        return await asyncio.shield(task)

    async def _publish(self) -> bool:
        try:
            from livekit import rtc

            if self._source is None:
                self._source = rtc.AudioSource(FILLER_SAMPLE_RATE, 1, queue_size_ms=self.queue_ms)
            if self._track is None:
                source = self._source
                assert isinstance(source, rtc.AudioSource), "a given source needs a given track"
                self._track = rtc.LocalAudioTrack.create_audio_track(FILLER_TRACK_NAME, source)
            options = rtc.TrackPublishOptions(
                source=rtc.TrackSource.SOURCE_UNKNOWN,
                # Opus DTX takes quiet noise for silence and replaces it with its own sparse
                # comfort noise; baton's encoder has it off for the same reason.
                dtx=False,
            )
            publication = await self.room.local_participant.publish_track(self._track, options)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("source filler: could not publish track %s: %s", FILLER_TRACK_NAME, e)
            return False
        if self._closed:  # closed while publishing: take it down again
            with contextlib.suppress(Exception):
                await self.room.local_participant.unpublish_track(publication.sid)
            return False
        self._sid = publication.sid
        log.info("source filler: published track %s (%s)", FILLER_TRACK_NAME, self._sid)
        return True

    # -- the handoff --

    def arm(self) -> None:
        """Get ready for :meth:`start`: publish the track in the background if it is not yet,
        then stream digital silence until :meth:`start` or :meth:`stop` (at most ``max_s``), so
        the caller's client has subscribed and is decoding when the noise begins. Returns at
        once: nothing waits for the publication. A filler still playing is left alone."""
        if self._closed:
            return
        if self._mode == "idle":
            self._mode = "armed"
            self._preroll = 0
        if self.published:
            if self._mode == "armed":
                self._ensure_stream()
        else:
            self._spawn(self._arm_when_published())

    async def _arm_when_published(self) -> None:
        if await self.publish() and self._mode == "armed":
            self._ensure_stream()

    def start(self) -> bool:
        """Start the comfort noise now (the agent's sentence is ending or over): fading in
        over 40 ms from -3 dB, then steady, until a stop, the hold, or ``max_s``. Returns
        whether it started, which is whether the track is published: a filler not published
        by now stays off for this handoff (its request must not announce one), and the
        pre-roll ends. Starting a filler that plays or fades restarts its counts."""
        if self._closed or not self.published:
            if self._mode == "armed":
                self._mode = "idle"
            return False
        if self._mode in ("idle", "armed"):
            # the pre-roll silence in the sink's queue would hold the noise back by up to
            # queue_ms; dropping silence is inaudible
            self._clear()
            self._ramp_from_db = FADE_IN_FROM_DB
            self._gain = 10.0 ** (FADE_IN_FROM_DB / 20.0)  # where the first frame begins
        else:  # fading (or playing): ramp up from where it is, not from -3 dB
            self._ramp_from_db = max(-60.0, 20.0 * math.log10(max(self._gain, 1e-3)))
        self._mode = "playing"
        self._cut = False
        self._ramp_at = 0
        self._played = 0
        self._hold_until = None
        self.stopped_by = None
        self._ensure_stream()
        return True

    def stop(self, fade_ms: int = FILLER_STOP_FADE_MS, *, why: str = "stop") -> None:
        """Fade the filler to silence over ``fade_ms`` (clamped to 0..5000; 0 stops at once and
        drops the queued audio), then stream nothing. A pre-roll just ends. A fade under way
        is only ever shortened. ``why`` is logged and kept in :attr:`stopped_by`."""
        fade_ms = max(0, min(MAX_FILLER_FADE_MS, int(fade_ms)))
        mode = self._mode
        if mode == "idle":
            return
        if mode == "armed":
            self._mode = "idle"
            return
        if fade_ms == 0:
            self._mode = "idle"
            self._cut = True
            self._clear()
            self.stopped_by = why
            log.info("source filler: stopped at once (%s)", why)
            return
        length = FILLER_SAMPLE_RATE * fade_ms // 1000
        if mode == "fading" and self._fade_len - self._fade_at <= length:
            return
        self.stopped_by = why
        self._mode = "fading"
        self._fade_from = self._gain
        self._fade_at = 0
        self._fade_len = length
        log.info("source filler: fading out over %d ms (%s)", fade_ms, why)

    def hold_until_speaking(self, cap_s: float = FILLER_HOLD_S) -> None:
        """This agent has the floor again (``activate``): keep the filler until it speaks (the
        ``speaking`` callable), then fade out over 250 ms; or fade after ``cap_s`` seconds if it
        does not. Does nothing unless the filler is playing."""
        if self._mode != "playing":
            return
        until = self._played + _frames(cap_s)
        self._hold_until = until if self._hold_until is None else min(until, self._hold_until)

    # -- closing --

    async def aclose(self) -> None:
        """Stop at once, cancel every task, and unpublish the track if the room is still
        connected (errors ignored). The filler cannot be used again. Every call waits for the
        same close, which goes on if the caller is cancelled."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._closed = True
        if self._mode != "idle":
            self.stopped_by = "closed"
        self._mode = "idle"
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        sid = self._sid
        self._sid = None
        if sid is not None and self._room_connected():
            try:
                await asyncio.wait_for(self.room.local_participant.unpublish_track(sid), 2.0)
            except Exception as e:
                log.debug("source filler: unpublish failed: %s", e)
        if self._own_source and self._source is not None:
            with contextlib.suppress(Exception):
                await self._source.aclose()

    def _room_connected(self) -> bool:
        check = getattr(self.room, "isconnected", None)
        if not callable(check):
            return True
        try:
            return bool(check())
        except Exception:
            return False

    # -- streaming --

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            log.warning("source filler task failed: %s", e, exc_info=e)

    def _ensure_stream(self) -> None:
        if self._closed or self._source is None:
            return
        if self._stream is None or self._stream.done():
            self._stream = self._spawn(self._run())

    def _clear(self) -> None:
        if self._source is not None:
            try:
                self._source.clear_queue()
            except Exception as e:
                log.debug("source filler: clear_queue failed: %s", e)

    async def _run(self) -> None:
        sink = self._source
        assert sink is not None
        while (frame := self._next_frame()) is not None:
            try:
                await sink.capture_frame(frame)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("source filler: frame not captured, filler off: %s", e)
                self._mode = "idle"
                return
            self.frames_sent += 1
            if self._cut and self._mode == "idle":
                # a capture that was waiting for room in the queue when stop(0) cleared it
                # has just put its frame in: drop it too
                self._cut = False
                self._clear()

    def _next_frame(self) -> rtc.AudioFrame | None:
        """The frame to stream next, or None to stop streaming. Decides the stops that are
        due (the hold, ``max_s``) before it makes the frame."""
        from livekit import rtc

        if self._mode == "idle":
            return None
        max_frames = _frames(self.max_s)
        if self._mode == "armed":
            if self._preroll >= max_frames:
                log.info("source filler: pre-roll ended after %.1f s without a start", self.max_s)
                self._mode = "idle"
                return None
            self._preroll += 1
            return rtc.AudioFrame(_SILENCE, FILLER_SAMPLE_RATE, 1, FRAME_SAMPLES)
        if self._mode == "playing":
            if self._hold_until is not None:
                if self._is_speaking():
                    self.stop(FILLER_STOP_FADE_MS, why="heard")
                elif self._played >= self._hold_until:
                    self.stop(FILLER_STOP_FADE_MS, why="hold_limit")
            if self._mode == "playing" and self._played >= max_frames:
                log.warning(
                    "source filler: played %.1f s without filler_stop; fading out", self.max_s
                )
                self.stop(FILLER_STOP_FADE_MS, why="max")
        return rtc.AudioFrame(self._noise_frame(), FILLER_SAMPLE_RATE, 1, FRAME_SAMPLES)

    def _is_speaking(self) -> bool:
        if self._speaking is None:
            return False
        try:
            return bool(self._speaking())
        except Exception:
            return False

    def _noise_frame(self) -> bytes:
        import numpy as np

        loop = comfort_noise_loop(self.noise_dbfs)
        idx = (self._pos + np.arange(FRAME_SAMPLES)) % len(loop)
        pcm = loop[idx].astype(np.float64)
        self._pos = (self._pos + FRAME_SAMPLES) % len(loop)
        self._played += 1
        k = np.arange(FRAME_SAMPLES, dtype=np.float64)
        if self._mode == "fading":
            gain = self._fade_from * np.clip(1.0 - (self._fade_at + k) / self._fade_len, 0.0, 1.0)
            self._fade_at += FRAME_SAMPLES
            if self._fade_at >= self._fade_len:
                self._mode = "idle"  # this frame ends in silence; the stream stops after it
            self._gain = float(gain[-1])
        elif self._ramp_at < self._ramp_len:
            # linear in dB from the ramp's start to 0 dB, then flat
            at = np.minimum((self._ramp_at + k) / self._ramp_len, 1.0)
            gain = 10.0 ** (self._ramp_from_db * (1.0 - at) / 20.0)
            self._ramp_at += FRAME_SAMPLES
            self._gain = float(gain[-1])
        else:
            self._gain = 1.0
            return loop[idx].tobytes()
        out: npt.NDArray[np.int16] = np.round(pcm * gain).astype(np.int16)
        return out.tobytes()
