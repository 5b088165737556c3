"""``hello`` until baton answers, and a repeated ``activate`` acted on once.

Two fixes of ``lk_baton.agents`` that the demo needed (commits 86abb9f and d11ce51):

* baton only hears a ``hello`` from a participant the server has already told it about, and on a
  loaded host that news can reach baton seconds after the agent's first data packet. baton then
  drops the ``hello`` and would never answer, so ``BatonLink.attach`` says ``hello`` again every
  ``HELLO_RETRY`` seconds until baton answers or ``answer_timeout`` passes.
* baton answers every ``hello`` from the floor holder with ``activate`` (always
  ``cause: "start"``, see ``on_hello`` / ``activate_holder_if_reachable`` in
  crates/baton-floor/src/arbiter.rs). When two ``hello`` were heard (the first answer was slow,
  or the agent reconnected), the holder gets ``activate`` while it already holds the floor;
  acting on it again would run the ``on_activate`` hook again (the agent greets the caller a
  second time, or repeats its first sentence after a handoff).

The resend is timed on a virtual clock (an event loop whose selector advances time instead of
sleeping), so the tests take no wall-clock seconds and the times asserted are exact. The rooms
are the in-memory ``FakeRoom`` of ``fakes.py``; its ``ArbiterBaton`` models the two behaviours
of baton's arbiter above and nothing else. The schedule itself is ``hello_schedule`` in
lk_baton.floor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fakes import (
    ArbiterBaton,
    FakeEffects,
    FakeRoom,
    FakeSender,
    Net,
    ScriptedLLM,
    b,
    run_virtual,
)
from livekit.agents import Agent, AgentSession

from lk_baton.agents import BatonLink
from lk_baton.floor import FloorClient

DELIVERY = 0.001
"""FakeRoom delivers a data packet 1 ms after it was published."""


def now() -> float:
    return asyncio.get_running_loop().time()


# ---------------------------------------------------------------------------------------------
# Linking an agent


async def attach(
    net: Net, name: str, *, answer_timeout: float = 5.0, **options: Any
) -> tuple[BatonLink, AgentSession[None]]:
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM(lambda _ctx: ("", [])))
    room = FakeRoom(net, f"agent-{name}")
    link = await BatonLink.attach(
        room,  # type: ignore[arg-type]
        session,
        agent_name=name,
        answer_timeout=answer_timeout,
        **options,
    )
    return link, session


async def settle(seconds: float = 0.5) -> None:
    """Let in-flight packets and timers run (virtual seconds)."""
    await asyncio.sleep(seconds)


# ---------------------------------------------------------------------------------------------
# hello until answered


def test_attach_says_hello_again_until_baton_hears_it() -> None:
    """baton learns of the agent 2.5 s after it joined: the hellos at 0, 1 and 2 s are dropped,
    the one at 3 s is answered, attach returns with the floor, and no hello follows."""

    async def main() -> None:
        net = Net()
        baton = ArbiterBaton(net, knows_at=2.5)
        t0 = now()
        link, session = await attach(net, "triage")
        took = now() - t0
        assert [round(t - DELIVERY - t0, 3) for t, _ in baton.hellos] == [0.0, 1.0, 2.0, 3.0]
        assert [heard for _, heard in baton.hellos] == [False, False, False, True]
        assert link.floor.answered and link.floor.active, "attach returned holding the floor"
        assert round(took, 3) == 3.0 + 2 * DELIVERY, took  # hello out, activate back
        await settle(10)
        assert len(baton.hellos) == 4, "no hello once baton has answered"
        await link.aclose()
        await session.aclose()

    run_virtual(main)


def test_attach_gives_up_after_answer_timeout() -> None:
    """baton never hears the agent: one hello per second up to answer_timeout (the last at the
    deadline), then attach returns unanswered (the agent stays silent) and stops saying hello."""

    async def main() -> None:
        net = Net()
        baton = ArbiterBaton(net, knows_at=1e9)
        t0 = now()
        link, session = await attach(net, "triage", answer_timeout=3.5)
        assert round(now() - t0, 3) == 3.5
        assert not link.floor.answered and not link.floor.active
        assert (session.output.audio_enabled, session.input.audio_enabled) == (False, False)
        await settle(10)
        sent = [round(t - DELIVERY - t0, 3) for t, _ in baton.hellos]
        assert sent == [0.0, 1.0, 2.0, 3.0, 3.5]
        await link.aclose()
        await session.aclose()

    run_virtual(main)


def test_a_standby_answer_ends_the_greeting_too() -> None:
    """Any answer counts (here ``deactivate(standby)`` for an agent not holding the floor): one
    hello when baton hears the first."""

    async def main() -> None:
        net = Net()
        baton = ArbiterBaton(net, holder="triage")
        link, session = await attach(net, "billing")
        assert [heard for _, heard in baton.hellos] == [True]
        assert link.floor.answered and not link.floor.active
        await settle(5)
        assert len(baton.hellos) == 1
        await link.aclose()
        await session.aclose()

    run_virtual(main)


# ---------------------------------------------------------------------------------------------
# A repeated activate is acted on once


def activate_counter() -> tuple[list[dict[str, Any]], Callable[[BatonLink, dict[str, Any]], None]]:
    calls: list[dict[str, Any]] = []

    def hook(_link: BatonLink, msg: dict[str, Any]) -> None:
        calls.append(msg)

    return calls, hook


def test_repeated_start_activate_is_ignored_by_the_floor() -> None:
    """Two ``activate(start)`` (baton's answers to two hellos): one ``activated`` event, the
    effects are switched on once."""
    s, e = FakeSender(), FakeEffects()
    events: list[str] = []
    f = FloorClient("triage", s, e, listener=lambda k, _m: events.append(k))
    f.hello()
    f.hello()
    first = b("activate", cause="start")
    f.handle(first)
    f.handle(b("activate", cause="start"))
    assert events == ["activated"]
    assert e.log == [("input", False), ("output", False), ("input", True), ("output", True)]
    assert f.active and f.last_activate == first


def test_start_activate_after_a_handoff_activation_is_ignored() -> None:
    """The target of h-1 holds the floor (``activate(handoff, h-1)``); its hello after a
    reconnect is answered with ``activate(start)``, which must not make it speak first again."""
    s, e = FakeSender(), FakeEffects()
    events: list[str] = []
    f = FloorClient("billing", s, e, listener=lambda k, _m: events.append(k))
    f.handle(b("prepare", handoff="h-1", source="triage", reason="r", bundle=False))
    f.ready("h-1")
    taking_over = b("activate", cause="handoff", handoff="h-1")
    f.handle(taking_over)
    f.hello()  # e.g. after its own reconnect
    f.handle(b("activate", cause="start"))
    assert events == ["prepare", "activated"]
    assert f.active and f.last_activate == taking_over


def test_activate_after_losing_the_floor_is_acted_on() -> None:
    """Idempotence does not swallow real floor changes: after ``deactivate`` (standby or a
    handoff) the next ``activate`` (start again, or a handback of the same handoff) counts."""
    s, e = FakeSender(), FakeEffects()
    events: list[str] = []
    f = FloorClient("triage", s, e, listener=lambda k, _m: events.append(k))
    f.handle(b("activate", cause="start"))
    f.handle(b("deactivate", reason="standby"))
    f.handle(b("activate", cause="start"))
    assert f.active
    f.handle(b("deactivate", reason="handoff", handoff="h-1"))
    assert s.sent[-1]["type"] == "quiet"
    f.handle(b("handoff_failed", handoff="h-1", target="billing", reason="target_no_show"))
    f.handle(b("activate", cause="handback", handoff="h-1", reason="target_no_show"))
    f.handle(b("activate", cause="handback", handoff="h-1", reason="target_no_show"))
    assert f.active
    assert events == [
        "activated",
        "deactivated",
        "activated",
        "deactivated",
        "quiet",
        "handoff_failed",
        "activated",
    ]


async def started(session: AgentSession[None]) -> None:
    await session.start(Agent(instructions="test"))


def test_slow_answer_to_two_hellos_runs_the_activate_hook_once() -> None:
    """The demo's "triage greeted twice": baton knows the agent but answers after 1.2 s, so the
    resend at 1 s is heard too and baton activates the holder twice. The hook runs once."""

    async def main() -> None:
        net = Net()
        baton = ArbiterBaton(net, answer_delay=1.2)
        calls, hook = activate_counter()
        link, session = await attach(net, "triage", on_activate=hook)
        await started(session)
        await settle(3)
        assert [heard for _, heard in baton.hellos] == [True, True]
        assert baton.sent_types("agent-triage") == ["activate", "activate"]
        assert len(calls) == 1, calls
        assert [k for _, k, _ in link.events] == ["activated"]
        await link.aclose()
        await session.aclose()

    run_virtual(main)


def test_reconnect_hello_does_not_rerun_the_activate_hook() -> None:
    """The holder reconnects (``reconnected`` on its room) and says hello again; baton answers
    ``activate(start)``: the floor is kept, the hook does not run again."""

    async def main() -> None:
        net = Net()
        baton = ArbiterBaton(net)
        calls, hook = activate_counter()
        link, session = await attach(net, "triage", on_activate=hook)
        await started(session)
        await settle()
        assert len(calls) == 1
        link.room.emit("reconnected")  # type: ignore[attr-defined]
        await settle()
        assert baton.sent_types("agent-triage") == ["activate", "activate"]
        assert len(calls) == 1, calls
        assert link.floor.active and session.output.audio_enabled
        await link.aclose()
        await session.aclose()

    run_virtual(main)


def test_a_baton_that_comes_back_is_greeted_until_it_answers() -> None:
    """baton's participant connects again (a restarted baton, or another worker's taking the
    room over) and learns of the agent 2.5 s later: the agent says hello again on the same
    schedule as at attach until the new baton answers, and the answer (``activate(start)`` to
    the floor holder) runs no second activation."""

    async def main() -> None:
        net = Net()
        baton = ArbiterBaton(net)
        activations, hook = activate_counter()
        link, session = await attach(net, "triage", on_activate=hook)
        await started(session)
        await settle()
        assert link.floor.active and len(activations) == 1
        n = len(baton.hellos)
        t0 = now()
        baton.knows_at = t0 + 2.5
        link.room.emit("participant_connected", baton.room.as_participant())
        await settle(10)
        again = baton.hellos[n:]
        assert [round(t - DELIVERY - t0, 3) for t, _ in again] == [0.0, 1.0, 2.0, 3.0]
        assert [heard for _, heard in again] == [False, False, False, True]
        assert link.floor.active and len(activations) == 1, "no second activation"
        await link.aclose()
        await session.aclose()

    run_virtual(main)
