"""The support desk's pieces without a server: the scripted models, espeak-ng TTS, and a
triage -> billing handoff of the real agents, headless (no room), with a stand-in for the
BatonLink that builds the bundle exactly as BatonLink.handoff does."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from livekit.agents import AgentSession, RunContext

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import billing
import desk
import triage
from lk_baton import bundle as bd
from lk_baton.agents import (
    RECOVERY_GREETING,
    HandoffTicket,
    build_handoff_bundle,
    chat_item_dict,
    read_bundle,
    seed_agent,
    state_to_dict,
)
from lk_baton.checkpoint import CheckpointTracker, merge_checkpoints, recovery_bundle
from lk_baton.floor import HandoffRefused


class RecordingBaton:
    """Stands in for BatonLink in TriageAgent: builds the bundle, records it, accepts."""

    def __init__(self) -> None:
        self.bundle: bd.Bundle | None = None

    async def handoff(self, target: str, *, reason: str, run_ctx: RunContext[Any], **kw: Any) -> HandoffTicket:
        await run_ctx.wait_for_playout()
        self.bundle = build_handoff_bundle(
            run_ctx.session.current_agent.chat_ctx,
            from_agent="triage",
            to_agent=target,
            reason=reason,
            user_state=state_to_dict(run_ctx.userdata),
            tried=kw.get("tried"),
            outcome=kw.get("outcome"),
            current_call=run_ctx.function_call,
            handoff_id="h-1",
        )
        return HandoffTicket("h-1", target, self.bundle, len(bd.encode_bundle(self.bundle)), None)


def test_triage_then_billing_first_sentence_uses_what_triage_heard() -> None:
    async def main() -> None:
        rec = RecordingBaton()
        s1: AgentSession[desk.Caller] = AgentSession(llm=desk.ScriptedLLM(triage.triage_script), userdata=desk.Caller())
        await s1.start(triage.TriageAgent(rec))  # type: ignore[arg-type]
        await s1.run(user_input="Hi, my account is A-1001 and I was charged twice for March.")
        await s1.aclose()
        assert rec.bundle is not None
        assert rec.bundle["user_state"]["account_id"] == "A-1001"
        assert "charged twice" in rec.bundle["reason"]

        received = read_bundle(bd.decode_bundle(bd.encode_bundle(rec.bundle)), user_state_type=desk.Caller)
        assert received.user_state.name == "Ada Lovelace"
        agent = await seed_agent(billing.BillingAgent(received.reason), received)
        s2: AgentSession[desk.Caller] = AgentSession(
            llm=desk.ScriptedLLM(billing.billing_script), userdata=received.user_state
        )
        await s2.start(agent)
        first = await s2.generate_reply()  # what BatonLink does on activate
        said = [i.text_content for i in agent.chat_ctx.items if i.type == "message" and i.role == "assistant"]
        assert first.done()
        line = said[-1] or ""
        assert "A-1001" in line and "you were charged twice for March" in line and "Ada" in line, line
        # billing never ran lookup_account itself, and still has triage's call in its context
        names = [i.name for i in agent.chat_ctx.items if i.type == "function_call"]
        assert names == ["lookup_account", "transfer_to_billing"]
        result = await s2.run(user_input="Yes please, refund it.")
        assert any(e.type == "function_call" and e.item.name == "refund_charge" for e in result.events)
        assert s2.userdata.notes == ["refunded 49.0 for March"]
        await s2.aclose()

    asyncio.run(main())


def test_triage_script_asks_for_the_account_first() -> None:
    from livekit.agents import llm

    ctx = llm.ChatContext.empty()
    assert "How can I help" in triage.triage_script(ctx)[0]
    ctx.add_message(role="user", content="I was charged twice")
    text, calls = triage.triage_script(ctx)
    assert "account number" in text and calls == []


def test_triage_books_a_technician_once_and_confirms_only_a_booking_it_knows() -> None:
    from livekit.agents import llm

    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content="Hi, my account is A-1001.")
    record = json.dumps(triage.ACCOUNTS["A-1001"])
    ctx.insert(llm.FunctionCall(call_id="c1", name="lookup_account", arguments='{"account_id":"A-1001"}'))
    ctx.insert(llm.FunctionCallOutput(call_id="c1", name="lookup_account", output=record, is_error=False))
    ctx.add_message(role="user", content="Please send a technician.")
    text, calls = triage.triage_script(ctx)
    assert calls == [("book_technician", {"account_id": "A-1001"})], (text, calls)
    ctx.insert(llm.FunctionCall(call_id="c2", name="book_technician", arguments='{"account_id":"A-1001"}'))
    assert triage.triage_script(ctx) == ("I see your account. What is the problem?", [])  # no second call
    unknown = "Not run: triage already started book_technician ... outcome is still unknown."
    ctx.insert(llm.FunctionCallOutput(call_id="c2", name="book_technician", output=unknown, is_error=False))
    text, calls = triage.triage_script(ctx)
    assert "not book a second visit" in text and calls == []
    ctx.items[-1] = llm.FunctionCallOutput(
        call_id="c2", name="book_technician", output='{"booked": "technician visit"}', is_error=False
    )
    assert triage.triage_script(ctx) == ("A technician will visit you tomorrow.", [])


def test_wav_parsing() -> None:
    hdr = b"RIFF\xff\xff\xff\x7fWAVEfmt " + (16).to_bytes(4, "little") + bytes(16)
    wav = hdr + b"data\xff\xff\xff\x7f" + b"\x01\x00\x02\x00\x03"
    assert desk.wav_pcm(wav) == b"\x01\x00\x02\x00"
    with pytest.raises(ValueError):
        desk.wav_pcm(b"nope")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_espeak_tts_makes_real_speech() -> None:
    async def main() -> None:
        t = desk.EspeakTTS()
        frames = []
        async with t.synthesize("Hello, this is billing.") as stream:
            async for ev in stream:
                frames.append(ev.frame)
        assert frames
        assert all(f.sample_rate == 22050 and f.num_channels == 1 for f in frames)
        samples = b"".join(bytes(f.data) for f in frames)
        seconds = len(samples) / 2 / 22050
        assert 0.5 < seconds < 5
        import array

        a = array.array("h", samples)
        rms = (sum(x * x for x in a) / len(a)) ** 0.5
        assert rms > 300, "audible speech, not silence"

    asyncio.run(main())


def test_models_are_scripted_without_openai_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert isinstance(desk.make_llm(triage.triage_script), desk.ScriptedLLM)
    if shutil.which("espeak-ng"):
        assert isinstance(desk.make_tts(), desk.EspeakTTS)
    json.dumps(desk.Caller().__dict__)


def test_trim_silence_keeps_speech_and_drops_padding() -> None:
    import struct

    rate = 1000
    quiet, loud = [0] * 500, [1000, -1000] * 100
    pcm = struct.pack(f"<{1200}h", *(quiet + loud + quiet))
    out = struct.unpack(f"<{len(pcm) // 2 - 0}h", pcm)
    trimmed = desk.trim_silence(pcm, rate, keep_ms=30)
    samples = struct.unpack(f"<{len(trimmed) // 2}h", trimmed)
    assert len(samples) == 200 + 2 * 30
    assert samples[30:230] == out[500:700]
    assert desk.trim_silence(b"", rate) == b""
    silent = struct.pack("<4h", 0, 1, -1, 0)
    assert desk.trim_silence(silent, rate) == silent


class RefusingBaton:
    """Stands in for BatonLink in TriageAgent: baton refuses every handoff."""

    async def handoff(self, target: str, **_: Any) -> HandoffTicket:
        raise HandoffRefused("target_no_show", target)


def test_triage_answers_when_the_last_item_is_a_failed_transfer() -> None:
    """Issue 13 item 6: the scripted triage said nothing after a refused or failed transfer
    (the last context item a transfer result), so the caller heard silence."""

    async def main() -> None:
        s: AgentSession[desk.Caller] = AgentSession(llm=desk.ScriptedLLM(triage.triage_script), userdata=desk.Caller())
        agent = triage.TriageAgent(RefusingBaton())  # type: ignore[arg-type]
        await s.start(agent)
        await s.run(user_input="Hi, my account is A-1001 and I was charged twice for March.")
        items = agent.chat_ctx.items
        at = next(
            i for i, x in enumerate(items) if x.type == "function_call_output" and x.name == "transfer_to_billing"
        )
        assert "failed (target_no_show)" in items[at].output  # type: ignore[union-attr]
        after = [x.text_content for x in items[at + 1 :] if x.type == "message" and x.role == "assistant"]
        assert after and after[0] and "billing team is not available" in after[0], after
        await s.aclose()

    asyncio.run(main())


def test_recovered_triage_goes_on_from_the_checkpoint_and_says_what_it_heard() -> None:
    """A triage that crashed mid-call, replaced from its checkpoints (issue 13): the
    replacement's context holds the checkpointed items item for item, and its first sentence
    (the recovery greeting of the scripted model) repeats what the caller said last."""

    async def main() -> None:
        s1: AgentSession[desk.Caller] = AgentSession(llm=desk.ScriptedLLM(triage.triage_script), userdata=desk.Caller())
        crashed = triage.TriageAgent(None)
        await s1.start(crashed)
        await s1.run(user_input="Hello, my account is A-1001.")
        await s1.run(user_input="My internet keeps dropping")
        tracker = CheckpointTracker("triage", item_id=lambda i: i.id, item_dict=chat_item_dict)
        raw = tracker.build(
            crashed.chat_ctx.items,
            user_state=state_to_dict(s1.userdata),
            agent_state={},
            journal=[],
            now=1.0,
        )
        assert raw is not None
        checkpointed = [chat_item_dict(i) for i in crashed.chat_ctx.items]
        await s1.aclose()

        state = merge_checkpoints(None, raw)
        received = read_bundle(
            bd.decode_bundle(
                bd.encode_bundle(recovery_bundle(state, reason="recovery after job_failed", recovery_id="r-1", now=2.0))
            ),
            user_state_type=desk.Caller,
        )
        assert received.cause == "recovery" and received.user_state.account_id == "A-1001"
        agent = await seed_agent(triage.TriageAgent(None), received)
        s2: AgentSession[desk.Caller] = AgentSession(
            llm=desk.ScriptedLLM(triage.triage_script), userdata=received.user_state
        )
        await s2.start(agent)
        await s2.generate_reply(instructions=RECOVERY_GREETING)  # what BatonLink does on activate
        ids = {d["id"] for d in checkpointed}
        kept = [chat_item_dict(i) for i in agent.chat_ctx.items if i.id in ids]
        assert kept == checkpointed, "item for item, in order"
        said = [i.text_content for i in agent.chat_ctx.items if i.type == "message" and i.role == "assistant"]
        assert "cut off" in (said[-1] or "") and "My internet keeps dropping" in (said[-1] or ""), said[-1]
        assert "Ada" in (said[-1] or "")
        await s2.aclose()

    asyncio.run(main())


def test_billing_script_answers_the_recovery_greeting_with_what_was_said() -> None:
    from livekit.agents import llm

    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content="Yes please, refund it.")
    assert "cut off" not in billing.billing_script(ctx)[0]
    ctx.add_message(role="system", content=RECOVERY_GREETING)
    text, calls = billing.billing_script(ctx)
    assert "cut off" in text and "Yes please, refund it" in text and calls == []
