"""Pieces the support-desk agents share: models (scripted or OpenAI), espeak-ng TTS, the
caller's state, and a small worker runner.

Offline by default: a deterministic scripted LLM and a local espeak-ng TTS, so the whole desk
runs without network or keys. With ``OPENAI_API_KEY`` set, the same agents use OpenAI's LLM and
TTS through ``livekit-plugins-openai`` (imported only then; install it yourself).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import struct
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    AgentServer,
    APIConnectOptions,
    JobContext,
    JobExecutorType,
    llm,
    tts,
)
from lk_baton.agents import remove_crashed_jobs

# ---------------------------------------------------------------------------------------------
# The caller's state, shared by both agents (travels in the bundle's user_state)


@dataclass
class Caller:
    account_id: str | None = None
    name: str | None = None
    plan: str | None = None
    problem: str | None = None
    verified: bool = False
    notes: list[str] = field(default_factory=list)


ACCOUNT_RE = re.compile(r"\b([A-Z]-\d{3,})\b")

# ---------------------------------------------------------------------------------------------
# Scripted LLM: a pure function of the chat context returns (text, tool calls)

Step = tuple[str, list[tuple[str, dict[str, Any]]]]
Script = Callable[[llm.ChatContext], Step]


class ScriptedLLM(llm.LLM):
    """A deterministic stand-in for a chat model: ``script(chat_ctx)`` decides the reply text and
    the tool calls. Streams the text word by word like a real model."""

    def __init__(self, script: Script) -> None:
        super().__init__()
        self.script = script

    @property
    def model(self) -> str:
        return "scripted"

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        **_: Any,
    ) -> llm.LLMStream:
        return _ScriptedStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _ScriptedStream(llm.LLMStream):
    async def _run(self) -> None:
        assert isinstance(self._llm, ScriptedLLM)
        text, calls = self._llm.script(self._chat_ctx)
        rid = f"scripted-{uuid.uuid4().hex[:8]}"
        for word in text.split(" ") if text else []:
            delta = llm.ChoiceDelta(role="assistant", content=word + " ")
            self._event_ch.send_nowait(llm.ChatChunk(id=rid, delta=delta))
            await asyncio.sleep(0)
        for name, args in calls:
            call = llm.FunctionToolCall(name=name, arguments=json.dumps(args), call_id=f"call_{uuid.uuid4().hex[:8]}")
            delta = llm.ChoiceDelta(role="assistant", tool_calls=[call])
            self._event_ch.send_nowait(llm.ChatChunk(id=rid, delta=delta))


def tool_output(ctx: llm.ChatContext, name: str) -> dict[str, Any] | None:
    """The last JSON output of tool ``name`` in the context, if any."""
    for item in reversed(ctx.items):
        if item.type == "function_call_output" and item.name == name and not item.is_error:
            try:
                out = json.loads(item.output)
            except ValueError:
                return None
            return out if isinstance(out, dict) else None
    return None


def user_messages(ctx: llm.ChatContext) -> list[str]:
    return [i.text_content or "" for i in ctx.items if i.type == "message" and i.role == "user"]


def instructions(ctx: llm.ChatContext) -> str:
    for i in ctx.items:
        if i.type == "message" and i.role in ("system", "developer"):
            return i.text_content or ""
    return ""


# ---------------------------------------------------------------------------------------------
# espeak-ng TTS


class EspeakTTS(tts.TTS):
    """Local speech synthesis with ``espeak-ng --stdout`` (22.05 kHz mono 16-bit WAV)."""

    SAMPLE_RATE = 22050

    def __init__(self, *, voice: str = "en-us", speed: int = 175, binary: str = "espeak-ng") -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=False),
            sample_rate=self.SAMPLE_RATE,
            num_channels=1,
        )
        path = shutil.which(binary)
        if path is None:
            raise RuntimeError(f"{binary} not found: install it (apt-get install -y espeak-ng)")
        self.binary = path
        self.voice = voice
        self.speed = speed

    @property
    def model(self) -> str:
        return "espeak-ng"

    @property
    def provider(self) -> str:
        return "local"

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        return _EspeakStream(tts=self, input_text=text, conn_options=conn_options)

    async def render(self, text: str) -> bytes:
        """Raw 16-bit little-endian PCM for ``text``."""
        proc = await asyncio.create_subprocess_exec(
            self.binary,
            "-v",
            self.voice,
            "-s",
            str(self.speed),
            "--stdout",
            text,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"espeak-ng failed ({proc.returncode}): {err.decode(errors='replace')}")
        return trim_silence(wav_pcm(out), self.SAMPLE_RATE)


def wav_pcm(wav: bytes) -> bytes:
    """The samples of a RIFF/WAVE file. espeak-ng writing to a pipe cannot seek back, so its
    header sizes are placeholders; the data chunk is taken to run to the end of the file."""
    if wav[:4] != b"RIFF" or wav[8:12] != b"WAVE":
        raise ValueError("not a WAV file")
    pos = 12
    while pos + 8 <= len(wav):
        cid = wav[pos : pos + 4]
        (size,) = struct.unpack("<I", wav[pos + 4 : pos + 8])
        if cid == b"data":
            data = wav[pos + 8 :]
            return data[: len(data) - len(data) % 2]
        pos += 8 + size + (size & 1)
    raise ValueError("WAV file without a data chunk")


def trim_silence(pcm: bytes, sample_rate: int, *, keep_ms: int = 30, threshold: int = 60) -> bytes:
    """``pcm`` (16-bit mono) without its leading and trailing silence beyond ``keep_ms``.

    espeak-ng pads every utterance with about 350 ms of silence at the end. An agent's turn
    (and a handoff, which waits for the current sentence to be played out) would carry that
    dead air; speech itself is untouched. ``threshold`` is the sample magnitude that counts as
    sound (60 of 32768 is about -55 dBFS)."""
    n = len(pcm) // 2
    if n == 0:
        return pcm
    samples = struct.unpack(f"<{n}h", pcm[: 2 * n])
    loud = [i for i, v in enumerate(samples) if abs(v) > threshold]
    if not loud:
        return pcm
    keep = sample_rate * keep_ms // 1000
    start = max(0, loud[0] - keep)
    end = min(n, loud[-1] + 1 + keep)
    return pcm[2 * start : 2 * end]


class _EspeakStream(tts.ChunkedStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        assert isinstance(self._tts, EspeakTTS)
        pcm = await self._tts.render(self.input_text)
        output_emitter.initialize(
            request_id=uuid.uuid4().hex,
            sample_rate=EspeakTTS.SAMPLE_RATE,
            num_channels=1,
            mime_type="audio/pcm",
        )
        output_emitter.push(pcm)
        output_emitter.flush()


# ---------------------------------------------------------------------------------------------
# Model choice


def use_openai() -> bool:
    return bool(os.environ.get("OPENAI_API_KEY"))


def make_llm(script: Script) -> llm.LLM:
    """OpenAI's chat model when OPENAI_API_KEY is set, else the scripted stand-in."""
    if use_openai():
        from livekit.plugins import openai  # type: ignore[attr-defined, unused-ignore]

        return openai.LLM(model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"))  # type: ignore[no-any-return, unused-ignore]
    return ScriptedLLM(script)


def make_tts(voice: str = "en-us") -> tts.TTS:
    """OpenAI's TTS when OPENAI_API_KEY is set, else espeak-ng."""
    if use_openai():
        from livekit.plugins import openai  # type: ignore[attr-defined, unused-ignore]

        return openai.TTS()  # type: ignore[no-any-return, unused-ignore]
    return EspeakTTS(voice=voice)


# ---------------------------------------------------------------------------------------------
# Worker runner


def say(agent: str, line: str) -> None:
    """One line on stdout per event, for people and for the demo script."""
    print(f"{agent}: {line}", flush=True)


MAX_JOBS = int(os.environ.get("DESK_MAX_JOBS", "10"))


def item_summary(item: dict[str, Any]) -> list[str]:
    """A chat item (as a bundle holds it: ``lk_baton.chat_item_dict``) in one comparable line:
    ``[id, type, role or tool name, text]``. Printed by triage at a handoff and by billing once
    seeded, so a test can check billing holds what triage sent."""
    content = item.get("content")
    if isinstance(content, list):
        text = " ".join(c for c in content if isinstance(c, str))
    else:
        text = str(item.get("output") or item.get("arguments") or "")
    return [str(item.get("id")), str(item.get("type")), str(item.get("role") or item.get("name") or ""), text]


def job_load(server: AgentServer) -> float:
    """The worker's load as the share of ``DESK_MAX_JOBS`` it runs (default 10).

    The framework's default reports the machine's CPU use, and the LiveKit server offers a job
    only to workers whose load is under its target (0.7): on a busy machine (a laptop building
    Rust, a shared CI runner) a desk worker would get no jobs at all, and baton would see the
    handoff target never arrive (``target_no_show``)."""
    return min(1.0, len(server.active_jobs) / max(MAX_JOBS, 1))


def job_executor() -> JobExecutorType:
    """Threads by default (light, fast to start); ``DESK_JOB_EXECUTOR=process`` runs each job
    in its own process, as livekit-agents does by default, so one job can die (a crash, a
    SIGKILL) while its worker lives on and takes the replacement job (issue 13's tests)."""
    if os.environ.get("DESK_JOB_EXECUTOR", "thread") == "process":
        return JobExecutorType.PROCESS
    return JobExecutorType.THREAD


def run_worker(agent_name: str, entrypoint: Callable[[JobContext], Awaitable[None]]) -> None:
    """Register a worker under ``agent_name`` (env ``<NAME>_AGENT_NAME`` overrides it) and
    serve jobs until SIGINT/SIGTERM. Needs LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET."""
    name = os.environ.get(f"{agent_name.upper()}_AGENT_NAME", agent_name)
    if level := os.environ.get("DESK_LOG"):  # e.g. DESK_LOG=INFO: the framework's own logs
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        server = AgentServer(
            job_executor_type=job_executor(),
            # none by default (light test machines); livekit-agents' own default keeps warm
            # processes, which a replacement after a crash starts in (bench/recovery.py)
            num_idle_processes=int(os.environ.get("DESK_IDLE_PROCESSES", "0")),
            port=0,
            load_fnc=job_load,
        )
        server.rtc_session(entrypoint, agent_name=name)
        # a job process that dies is removed from its room at once, so baton replaces it
        # without waiting for the heartbeats' silence (docs/protocol.md, recovery)
        remove_crashed_jobs(server)
        server.on("worker_registered", lambda *_: say(agent_name, "registered"))
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        run = asyncio.create_task(server.run(devmode=True))
        await stop.wait()
        await server.aclose()
        run.cancel()
        say(agent_name, "stopped")

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
