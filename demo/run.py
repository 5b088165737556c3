"""The baton demo: a support desk call handed from one agent process to another.

Starts a local LiveKit server (free ports), ``baton worker`` and the two livekit-agents workers
of ``examples/support-desk`` (triage and billing, each its own process), then plays a caller
(a real ``livekit`` participant) who types to triage through the framework's text input. Triage
looks up the account and hands the call to billing through baton; billing speaks first with what
only triage heard. Prints a report (handoff timeline, transcript, longest silence, bundle size),
writes it as JSON and plots the caller's received audio level per track as a PNG.

Every process it starts runs in its own process group and is stopped on exit, on an error and
on Ctrl-C / SIGTERM.

    .venv/bin/python demo/run.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from harness import (  # noqa: E402
    API_KEY,
    API_SECRET,
    Baton,
    LiveKitServer,
    Process,
    baton_worker,
    dispatch_token,
)
from livekit import rtc  # noqa: E402
from peers import Recorder, audible_grid, is_filler, longest_run  # noqa: E402

DESK = ROOT / "examples" / "support-desk"
CONFIG = ROOT / "configs" / "baton.toml"
CALLER = "caller"
PROBLEM = "Hi, my account is A-1001 and I was charged twice for March."
FOLLOW_UP = "Yes please, refund it."
# Facts only triage heard (from the caller or from its own lookup); billing's first sentence must
# carry them to prove the context arrived.
FACTS = ("Ada", "A-1001", "Pro", "charged twice for March")


# ---------------------------------------------------------------------------------------------
# Processes


class Stopping(Exception):
    """Raised in the main thread on SIGTERM so every ``finally`` runs."""


@dataclass
class Procs:
    """Every process the demo started; :meth:`stop_all` stops them (process group first)."""

    server: LiveKitServer | None = None
    children: list[tuple[str, Baton]] = field(default_factory=list)

    def stop_all(self) -> None:
        for name, p in reversed(self.children):
            _stop_group(name, p.proc)
            with contextlib.suppress(Exception):
                p._reader.join(timeout=2)
        self.children.clear()
        if self.server is not None and self.server.proc is not None:
            _stop_group("livekit-server", self.server.proc)
            self.server.proc = None


def _stop_group(name: str, proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        print(f"[demo] {name} ignored SIGTERM; killing it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait()


def agent_env(server: LiveKitServer) -> dict[str, str]:
    """The environment of an agent worker process: this server, unbuffered output."""
    return {
        **os.environ,
        "LIVEKIT_URL": server.url,
        "LIVEKIT_API_KEY": API_KEY,
        "LIVEKIT_API_SECRET": API_SECRET,
        "PYTHONUNBUFFERED": "1",
        "DESK_LOG": os.environ.get("DESK_LOG", ""),
    }


def agent_worker(server: LiveKitServer, script: str) -> Process:
    return agent_process(server, [str(DESK / script)])


def agent_process(server: LiveKitServer, args: list[str]) -> Process:
    """A Python agent worker (`python args...`) in its own process group, output captured."""
    env = agent_env(server)
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    return Process(proc)


# ---------------------------------------------------------------------------------------------
# The caller


@dataclass
class Line:
    at: float
    who: str
    text: str


@dataclass
class CallResult:
    levels: dict[str, list[tuple[float, float]]]  # per identity, arrival times (Recorder.arrived)
    transcript: list[Line]
    t_start: float
    t_end: float
    identities: dict[str, str]  # agent name -> participant identity
    played: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    """Per identity on the playout clock, each track placed on its own (Recorder.played)."""


class Caller:
    """A real LiveKit participant: types on ``lk.chat``, reads ``lk.transcription``, records audio."""

    def __init__(self) -> None:
        self.room = rtc.Room()
        self.recorder = Recorder(self.room)
        self.transcript: list[Line] = []
        self.agents: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.room.register_text_stream_handler("lk.transcription", self._on_transcription)

    def _on_transcription(self, reader: rtc.TextStreamReader, identity: str) -> None:
        t = asyncio.ensure_future(self._read(reader, identity))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _read(self, reader: rtc.TextStreamReader, identity: str) -> None:
        at = asyncio.get_running_loop().time()
        self.agent_identity("")  # remember who is who while they are in the room
        try:
            text = (await reader.read_all()).strip()
        except rtc.data_stream.StreamError:
            return  # the speaker left mid-sentence (e.g. released after the handoff)
        if text:
            self.transcript.append(Line(at, identity, text))
            self._changed.set()

    def agent_identity(self, agent_name: str) -> str | None:
        """The identity of the participant whose server-set agent name is ``agent_name`` (remembered
        after it leaves: triage leaves once billing has the floor)."""
        for p in self.room.remote_participants.values():
            name = p.attributes.get("lk.agent.name") or p.attributes.get("lk.agent_name")
            if name:
                self.agents.setdefault(name, p.identity)
        return self.agents.get(agent_name)

    async def say(self, text: str) -> None:
        self.transcript.append(Line(asyncio.get_running_loop().time(), CALLER, text))
        await self.room.local_participant.send_text(text, topic="lk.chat")

    async def wait_line(self, agent_name: str, pattern: str, timeout: float, after: int = 0) -> Line:
        """The first transcript line (from index ``after``) by ``agent_name`` matching ``pattern``."""
        rx = re.compile(pattern, re.I)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            who = self.agent_identity(agent_name)
            for line in self.transcript[after:]:
                if who is not None and line.who == who and rx.search(line.text):
                    return line
            left = deadline - loop.time()
            if left <= 0:
                heard = "\n".join(f"  {x.who}: {x.text}" for x in self.transcript)
                raise TimeoutError(f"{agent_name} never said /{pattern}/ within {timeout}s; heard:\n{heard}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.2))


async def call(server: LiveKitServer, room: str, quick: bool) -> CallResult:
    caller = Caller()
    loop = asyncio.get_running_loop()
    await caller.room.connect(server.url, dispatch_token(CALLER, room, ["baton"]))
    t_start = loop.time()
    try:
        print("[demo] caller joined; waiting for triage's greeting", file=sys.stderr)
        await caller.wait_line("triage", r"support desk", timeout=45)
        await asyncio.sleep(0.3)
        n = len(caller.transcript)
        await caller.say(PROBLEM)
        print(f"[demo] caller: {PROBLEM}", file=sys.stderr)
        await caller.wait_line("billing", r"billing", timeout=45, after=n)
        if quick:
            await asyncio.sleep(1.5)
        else:
            await asyncio.sleep(1.0)
            n = len(caller.transcript)
            await caller.say(FOLLOW_UP)
            await caller.wait_line("billing", r"refunded", timeout=30, after=n)
            await asyncio.sleep(1.0)
        t_end = loop.time()
        ids = {a: caller.agent_identity(a) or "" for a in ("triage", "billing")}
        rec = caller.recorder
        return CallResult(rec.arrived(), list(caller.transcript), t_start, t_end, ids, rec.played())
    finally:
        await caller.recorder.stop()
        await caller.room.disconnect()


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class Report:
    room: str
    timeline: dict[str, Any]
    phases_ms: dict[str, int]
    transcript: list[dict[str, Any]]
    billing_first: str
    facts_in_billing_first: dict[str, bool]
    silence_handoff_ms: float
    """Longest stretch with nothing audible between triage's last and billing's first sound,
    on the caller's playout clock (:func:`played_at`)."""
    silence_handoff_arrival_ms: float
    """The same on the caller process's arrival clock (inflated when that process stalls)."""
    silence_start_ms: float | None
    """Of that window, the part before a filler is first heard: triage's trailing silence (its
    speech ends before its audio does), then triage's own filler starts on its second track
    (baton's, one hop later, when triage plays none). None when no filler was heard."""
    silence_after_filler_ms: float | None
    """The longest silence from the first filler sound to billing's first: the switch (filler
    under the handoff, then the target). None when no filler was heard."""
    silence_call_ms: float
    overlap_ms: float
    filler_heard_ms: float
    bundle_bytes: int
    request_to_billing_audio_ms: float | None
    quiet_to_billing_audio_ms: float | None
    """From baton's ``source_quiet`` mark (triage's last word: with the request made at the tool
    call, ``request`` is the start of triage's last sentence) to billing's first audio."""
    plot: str | None
    identities: dict[str, str]
    heard_ms: dict[str, float | None]
    """At the caller, ms from the request: triage's last sound, the first filler (either), triage's
    own filler, baton's filler, billing's first sound."""
    filler_under_billing_ms: int | None
    """How long after billing's first sound the caller still heard a filler."""
    recorded_after_billing_ms: int | None


def handoff_timeline(baton: Baton, timeout: float) -> tuple[dict[str, Any], float]:
    """baton's JSON line for the handoff, and the caller-clock time of its ``requested`` phase
    (when baton logged it; baton's ``ms`` count from there)."""
    _, line = baton.wait_for(r'^\{"handoff":.*"outcome":', timeout)
    timeline = json.loads(line)
    at, _ = baton.wait_for(r"handoff phase.*phase=Requested", 1)
    return timeline, at


def build_report(room: str, res: CallResult, timeline: dict[str, Any], t_request: float, plot: str | None) -> Report:
    phases: dict[str, int] = {}
    for p in timeline.get("phases", []):
        phases.setdefault(str(p["phase"]), int(p["ms"]))
    triage, billing = res.identities["triage"], res.identities["billing"]
    step = 0.01
    grid = audible_grid(res.played, res.t_start, res.t_end, step=step)

    def slot_time(i: int) -> float:
        return res.t_start + i * step

    req_slot = int((t_request - res.t_start) / step)
    billing_first_slot = next((i for i, c in enumerate(grid) if billing in c), None)
    last_triage = req_slot
    # The handoff as heard: from triage's last sound before billing's first sound to billing's
    # first sound. Only filler (or nothing) can be heard there.
    if billing_first_slot is not None:
        last_triage = max((i for i, c in enumerate(grid[:billing_first_slot]) if triage in c), default=req_slot)
        window = grid[last_triage + 1 : billing_first_slot]
    else:
        window = grid[req_slot:]
    silence_handoff = longest_run(window, lambda c: not c)
    raw = audible_grid(res.levels, res.t_start, res.t_end, step=step)
    raw_window = raw[last_triage + 1 : billing_first_slot] if billing_first_slot is not None else raw[req_slot:]
    silence_handoff_raw = longest_run(raw_window, lambda c: not c)
    def has_filler(c: set[str]) -> bool:
        return any(is_filler(w) for w in c)

    heard: dict[str, float | None] = {
        "triage_last": None,
        "filler_first": None,
        "source_filler_first": None,
        "baton_filler_first": None,
        "billing_first": None,
    }
    if billing_first_slot is not None:
        heard["triage_last"] = (slot_time(last_triage) - t_request) * 1000
        heard["billing_first"] = (slot_time(billing_first_slot) - t_request) * 1000
        for key, pred in (
            ("filler_first", has_filler),
            ("source_filler_first", lambda c: any(is_filler(w) and w != "baton" for w in c)),
            ("baton_filler_first", lambda c: "baton" in c),
        ):
            f = next((i for i, c in enumerate(window) if pred(c)), None)
            if f is not None:
                heard[key] = (slot_time(last_triage + 1 + f) - t_request) * 1000
    first_filler = next((i for i, c in enumerate(window) if has_filler(c)), None)
    silence_start = None if first_filler is None else first_filler * step
    silence_after_filler = None if first_filler is None else longest_run(window[first_filler:], lambda c: not c)
    filler = sum(1 for c in window if has_filler(c)) * step
    overlap = longest_run(grid, lambda c: triage in c and billing in c)
    filler_under_billing = None
    if billing_first_slot is not None:
        last_filler = max((i for i, c in enumerate(grid) if has_filler(c)), default=billing_first_slot)
        filler_under_billing = max(0, last_filler - billing_first_slot) * step * 1000
    # The whole call, from triage's first sound: includes pauses inside and between sentences and
    # the time the caller spends "typing"; informative, not a handoff number.
    first_any = next((i for i, c in enumerate(grid) if c), 0)
    silence_call = longest_run(grid[first_any:], lambda c: not c)
    to_audio = quiet_to_audio = None
    if billing_first_slot is not None:
        to_audio = (slot_time(billing_first_slot) - t_request) * 1000
        if "source_quiet" in phases:
            quiet_to_audio = to_audio - phases["source_quiet"]
    billing_lines = [x for x in res.transcript if x.who == billing]
    first = billing_lines[0].text if billing_lines else ""
    return Report(
        room=room,
        timeline=timeline,
        phases_ms=phases,
        transcript=[
            {"ms": round((x.at - res.t_start) * 1000), "who": _who(x.who, res.identities), "text": x.text}
            for x in sorted(res.transcript, key=lambda x: x.at)
        ],
        billing_first=first,
        facts_in_billing_first={f: f.lower() in first.lower() for f in FACTS},
        silence_handoff_ms=round(silence_handoff * 1000, 1),
        silence_handoff_arrival_ms=round(silence_handoff_raw * 1000, 1),
        silence_start_ms=None if silence_start is None else round(silence_start * 1000, 1),
        silence_after_filler_ms=None if silence_after_filler is None else round(silence_after_filler * 1000, 1),
        silence_call_ms=round(silence_call * 1000, 1),
        overlap_ms=round(overlap * 1000, 1),
        filler_heard_ms=round(filler * 1000, 1),
        bundle_bytes=int(timeline.get("bundle_bytes") or 0),
        request_to_billing_audio_ms=None if to_audio is None else round(to_audio),
        quiet_to_billing_audio_ms=None if quiet_to_audio is None else round(quiet_to_audio),
        plot=plot,
        identities=res.identities,
        heard_ms={k: None if v is None else round(v) for k, v in heard.items()},
        filler_under_billing_ms=None if filler_under_billing is None else round(filler_under_billing),
        recorded_after_billing_ms=None
        if billing_first_slot is None
        else round((len(grid) - billing_first_slot) * step * 1000),
    )


def _who(identity: str, ids: dict[str, str]) -> str:
    for name, ident in ids.items():
        if ident == identity:
            return name
    return identity


def plot_levels(res: CallResult, timeline: dict[str, Any], t_request: float, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[demo] matplotlib missing: no plot (pip install -r requirements-dev.txt)", file=sys.stderr)
        return None
    fig, (ax, zoom) = plt.subplots(2, 1, figsize=(12, 7), height_ratios=[1, 1])
    names = {v: k for k, v in res.identities.items() if v}
    colours = {"triage": "tab:blue", "billing": "tab:green", "baton": "tab:gray", "triage/filler": "tab:olive"}
    for who, series in sorted(res.played.items()):
        base, _, own = who.partition("/")
        label = names.get(base, base) + (f"/{own}" if own else "")
        xs = [t - res.t_start for t, _ in series]
        ys = [max(level, -90.0) if math.isfinite(level) else -90.0 for _, level in series]
        for a in (ax, zoom):
            a.plot(xs, ys, lw=0.7, label=label, color=colours.get(label))
    req = t_request - res.t_start
    seen: set[str] = set()
    for i, p in enumerate(timeline.get("phases", [])):
        name = str(p["phase"])
        if name in seen:
            continue
        seen.add(name)
        x = req + int(p["ms"]) / 1000
        for a in (ax, zoom):
            a.axvline(x, color="tab:red", lw=0.6, ls="--")
        zoom.annotate(
            f"{name} {p['ms']} ms",
            (x, -88 + (i % 6) * 7),
            fontsize=7,
            rotation=0,
            color="tab:red",
        )
    end = req + max((int(p["ms"]) for p in timeline.get("phases", [])), default=0) / 1000
    zoom.set_xlim(req - 1.0, end + 1.5)
    for a in (ax, zoom):
        a.axhline(-55, color="k", lw=0.5, ls=":")
        a.set_ylim(-92, 0)
        a.set_ylabel("level, dBFS per 10 ms")
    ax.set_title("What the caller heard, per track, 10 ms frames (dotted: audible threshold -55 dBFS)")
    zoom.set_title(f"The handoff {timeline.get('handoff')} (dashed: baton's phases)")
    zoom.set_xlabel("seconds since the caller joined")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def print_report(r: Report) -> None:
    tl = r.timeline
    print()
    print(f"=== baton demo: room {r.room}")
    print(
        f"handoff {tl.get('handoff')}: {tl.get('source')} -> {tl.get('target')}  outcome={tl.get('outcome')}"
        f"  warm={tl.get('warm')}"
    )
    print(f"reason: {tl.get('reason')}")
    print("timeline (ms from the request):")
    for p in tl.get("phases", []):
        detail = f"  ({p['detail']})" if p.get("detail") else ""
        print(f"  {p['ms']:>6}  {p['phase']}{detail}")
    print(f"bundle: {r.bundle_bytes} bytes")
    print()
    print("what the caller heard (ms since joining; transcriptions on lk.transcription):")
    for x in r.transcript:
        print(f"  {x['ms']:>6}  {x['who']:>8}: {x['text']}")
    print()
    print(f"longest silence during the handoff (triage's last sound -> billing's first): {r.silence_handoff_ms:.0f} ms")
    print(
        f"  (on the caller process's arrival clock, which stalls on this busy machine: "
        f"{r.silence_handoff_arrival_ms:.0f} ms)"
    )
    if r.silence_start_ms is not None:
        print(
            f"  of which before the filler was heard: {r.silence_start_ms:.0f} ms; "
            f"after it, until billing: {r.silence_after_filler_ms:.0f} ms"
        )
    h = r.heard_ms
    print(
        f"at the caller (ms from the request): triage's last sound {h['triage_last']}, filler from "
        f"{h['filler_first']} (triage's own {h['source_filler_first']}, baton's {h['baton_filler_first']}), "
        f"billing's first sound {h['billing_first']}"
    )
    print(f"filler heard during the handoff: {r.filler_heard_ms:.0f} ms; triage/billing overlap: {r.overlap_ms:.0f} ms")
    if r.request_to_billing_audio_ms is not None:
        print(f"request -> billing's first audio at the caller: {r.request_to_billing_audio_ms:.0f} ms")
    if r.quiet_to_billing_audio_ms is not None:
        print(f"triage quiet -> billing's first audio at the caller: {r.quiet_to_billing_audio_ms:.0f} ms")
    if r.filler_under_billing_ms is not None:
        print(
            f"filler still heard {r.filler_under_billing_ms} ms after billing's first sound "
            f"(recording went on {r.recorded_after_billing_ms} ms after it)"
        )
    print(
        f"longest silence over the whole call: {r.silence_call_ms:.0f} ms (includes turn-taking and pauses in speech)"
    )
    facts = ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in r.facts_in_billing_first.items())
    print(f"billing's first sentence uses what only triage heard: {facts}")
    if r.plot:
        print(f"plot: {r.plot}")


# ---------------------------------------------------------------------------------------------
# Main


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP raise :class:`Stopping` (SIGINT raises KeyboardInterrupt), so cleanup runs."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Stopping(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    # Ctrl-C even when started in the background of a script (which inherits SIGINT ignored)
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def wait_all(procs: list[tuple[str, Baton, str]], timeout: float) -> None:
    for name, p, pattern in procs:
        try:
            p.wait_for(pattern, timeout)
        except TimeoutError:
            raise RuntimeError(f"{name} did not register within {timeout}s:\n{p.text()[-3000:]}") from None
        print(f"[demo] {name} registered", file=sys.stderr)


def run_demo(quick: bool, out: Path, keep_logs: bool) -> Report:
    out.mkdir(parents=True, exist_ok=True)
    procs = Procs()
    room = f"support-{uuid.uuid4().hex[:6]}"
    ok = False
    try:
        procs.server = LiveKitServer()
        procs.server.start()
        print(f"[demo] livekit-server on {procs.server.url}", file=sys.stderr)
        baton = baton_worker(procs.server, "--config", str(CONFIG))
        procs.children.append(("baton", baton))
        triage = agent_worker(procs.server, "triage.py")
        procs.children.append(("triage", triage))
        billing = agent_worker(procs.server, "billing.py")
        procs.children.append(("billing", billing))
        wait_all(
            [
                ("baton worker", baton, r"worker registered"),
                ("triage worker", triage, r"^triage: registered"),
                ("billing worker", billing, r"^billing: registered"),
            ],
            timeout=60,
        )
        res = asyncio.run(asyncio.wait_for(call(procs.server, room, quick), 150))
        timeline, t_request = handoff_timeline(baton, timeout=10)
        plot = plot_levels(res, timeline, t_request, out / "handoff.png")
        report = build_report(room, res, timeline, t_request, plot)
        (out / "report.json").write_text(json.dumps(asdict(report), indent=2))
        write_levels(out / "levels.json", res, t_request=t_request)
        ok = True
        return report
    finally:
        stop_and_keep_logs(procs, out, show=not ok or keep_logs)


def write_levels(path: Path, res: CallResult, **marks: float) -> None:
    """The caller's levels per identity (arrival times, seconds since the caller joined) and
    ``marks`` (caller-clock times such as ``t_request``) as JSON."""
    doc: dict[str, Any] = {"t_start": res.t_start, **marks}
    doc["levels"] = {
        w: [[round(t - res.t_start, 4), round(v, 1) if math.isfinite(v) else None] for t, v in s]
        for w, s in res.levels.items()
    }
    path.write_text(json.dumps(doc))


def stop_and_keep_logs(procs: Procs, out: Path, *, show: bool) -> None:
    """Stop every process the demo started and write their logs (and the server's) to ``out``."""
    procs_named = list(procs.children)
    procs.stop_all()
    if procs.server is not None:
        procs.server.stop()
    for name, p in procs_named:
        (out / f"{name}.log").write_text(p.text() + "\n")
    if procs.server is not None:
        with contextlib.suppress(OSError):
            (out / "livekit-server.log").write_text(procs.server.log_path.read_text(errors="replace"))
            procs.server.log_path.unlink()
    if show:
        print(f"[demo] logs in {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="stop after billing's first sentence (for tests)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="report, plot and logs (default out/demo)")
    ap.add_argument(
        "--crash",
        action="store_true",
        help="kill triage's job process mid-sentence and show the recovery (demo/crash.py)",
    )
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    if args.crash:
        import crash

        try:
            with signals_raise():
                crashed = crash.run_crash(args.out)
        except (KeyboardInterrupt, Stopping) as e:
            print(f"\n[demo] interrupted ({type(e).__name__} {e}); every process stopped", file=sys.stderr)
            return 130
        crash.print_report(crashed)
        print(f"report: {args.out / 'report.json'}  ({time.monotonic() - t0:.1f} s)")
        return 0 if crashed.refers_to_what_was_said else 1
    try:
        with signals_raise():
            report = run_demo(args.quick, args.out, keep_logs=True)
    except (KeyboardInterrupt, Stopping) as e:
        print(f"\n[demo] interrupted ({type(e).__name__} {e}); every process stopped", file=sys.stderr)
        return 130
    print_report(report)
    print(f"report: {args.out / 'report.json'}  ({time.monotonic() - t0:.1f} s)")
    return 0 if report.timeline.get("outcome") == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
