//! Property: whatever happens, in whatever order, the caller never hears two agents at once,
//! never hears silence while a handoff has nobody audible, and never hears filler longer than
//! the configured limit; once the floor has changed hands the filler plays on only until the new
//! holder is heard, at most `filler_hold`; the timeline's `filler_off` is the instant the filler
//! really stops; and the arbiter never panics.
//!
//! The model below replays the arbiter's commands the way the room would execute them (mute
//! state per track, who was told to activate, whether filler plays) and checks the invariant
//! after every event and every timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use baton_floor::{
    AgentMessage, Alert, Arbiter, AudioTrack, BatonMessage, Command, DispatchTicket, Event, FillerCommand,
    Kind, Outcome, Participant, ParticipantKind, Phase, Policy, TransferId,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// (identity, kind, agent name)
const PEOPLE: &[(&str, ParticipantKind, Option<&str>)] = &[
    ("caller", ParticipantKind::Sip, None),
    ("viewer", ParticipantKind::Standard, None),
    ("agent-triage", ParticipantKind::Agent, Some("triage")),
    ("agent-billing", ParticipantKind::Agent, Some("billing")),
    ("agent-billing-2", ParticipantKind::Agent, Some("billing")),
    ("agent-support", ParticipantKind::Agent, Some("support")),
    ("agent-sales", ParticipantKind::Agent, Some("sales")),
];
const NAMES: &[&str] = &["triage", "billing", "support", "sales"];

fn policy() -> Policy {
    let mut p = Policy::with_agents(["triage", "billing", "support"]);
    p.alternates.insert("billing".into(), vec!["support".into()]);
    p.alternates.insert("support".into(), vec!["billing".into(), "triage".into()]);
    p.max_filler = Duration::from_secs(12);
    // Distinct from filler_fade, so the model can tell a fade under the holder's first words.
    p.filler_tail = Duration::from_millis(900);
    p
}

fn participant(who: usize, audio: Option<bool>, dispatch: Option<u8>) -> Participant {
    let (identity, kind, name) = PEOPLE[who];
    Participant {
        identity: identity.into(),
        kind,
        agent_name: name.map(Into::into),
        dispatch_id: dispatch.map(|d| format!("AD_{d}")),
        audio: audio.map(|muted| AudioTrack { sid: format!("TR_{identity}"), muted }),
    }
}

#[derive(Debug, Clone)]
enum Step {
    Event(Event),
    Advance(u64),
}

fn person() -> impl Strategy<Value = usize> {
    // Agents that matter are drawn more often than bystanders.
    prop_oneof![
        1 => Just(0usize),
        1 => Just(1usize),
        4 => Just(2usize),
        4 => Just(3usize),
        1 => Just(4usize),
        2 => Just(5usize),
        1 => Just(6usize),
    ]
}

fn audio() -> impl Strategy<Value = Option<bool>> {
    prop_oneof![1 => Just(None), 3 => Just(Some(false)), 2 => Just(Some(true))]
}

fn message() -> impl Strategy<Value = AgentMessage> {
    let name = prop::sample::select(NAMES).prop_map(String::from);
    let handoff_id = (1u8..4).prop_map(|n| format!("h-{n}"));
    let transfer = prop::option::of((1u128..3).prop_map(TransferId::new));
    prop_oneof![
        3 => (name.clone(), prop::option::of(Just(250u32))).prop_map(|(agent_name, heartbeat_ms)| {
            AgentMessage::Hello { agent_name, role: None, heartbeat_ms }
        }),
        3 => (0u64..100).prop_map(|seq| AgentMessage::Heartbeat { seq }),
        // A source that plays its own filler whenever it says it is quiet, as the Python
        // adapter does (one draw fewer: the sequences, and so the coverage, stay as they were).
        3 => (name, transfer, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(target, transfer, bundle_follows, quiet, speaking)| AgentMessage::Handoff {
                target,
                reason: "because".into(),
                transfer,
                bundle_follows,
                quiet,
                quiet_ms: None,
                filler: quiet || speaking,
                speaking,
            }
        ),
        1 => handoff_id.clone().prop_map(|handoff| AgentMessage::Tail {
            handoff,
            items: vec![serde_json::json!({"id": "item_1", "type": "message"})],
            user_state: None,
        }),
        3 => handoff_id.prop_map(|handoff| AgentMessage::Ready { handoff }),
        2 => prop::option::of(0u32..200).prop_map(|quiet_ms| AgentMessage::Quiet { handoff: None, quiet_ms }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let transfer = (1u128..3).prop_map(TransferId::new);
    prop_oneof![
        3 => (person(), audio(), prop::option::of(0u8..4))
            .prop_map(|(w, a, d)| Step::Event(Event::ParticipantJoined(participant(w, a, d)))),
        3 => (person(), audio()).prop_map(|(w, a)| Step::Event(Event::ParticipantUpdated(participant(w, a, None)))),
        1 => person().prop_map(|w| Step::Event(Event::ParticipantLeft { identity: PEOPLE[w].0.into() })),
        2 => (person(), any::<bool>()).prop_map(|(w, speaking)| {
            Step::Event(Event::SpeakingChanged { identity: PEOPLE[w].0.into(), speaking })
        }),
        8 => (person(), message(), 0u32..1000).prop_map(|(w, message, id)| {
            Step::Event(Event::Control { from: PEOPLE[w].0.into(), id: format!("m-{id}"), message })
        }),
        2 => (person(), transfer.clone(), 0u64..20_000).prop_map(|(w, transfer_id, bytes)| {
            Step::Event(Event::BundleReceived { from: PEOPLE[w].0.into(), transfer_id, bytes })
        }),
        2 => (person(), transfer.clone()).prop_map(|(w, transfer_id)| {
            Step::Event(Event::BundleDelivered { to: PEOPLE[w].0.into(), transfer_id })
        }),
        1 => (person(), transfer).prop_map(|(w, transfer_id)| {
            Step::Event(Event::TransferFailed { peer: PEOPLE[w].0.into(), transfer_id, reason: "x".into() })
        }),
        2 => (0u64..8, 0u8..4).prop_map(|(t, d)| {
            Step::Event(Event::DispatchCreated { ticket: DispatchTicket(t), dispatch_id: format!("AD_{d}") })
        }),
        1 => (0u64..8).prop_map(|t| {
            Step::Event(Event::DispatchFailed { ticket: DispatchTicket(t), error: "503".into() })
        }),
        1 => (person(), any::<bool>()).prop_map(|(w, failed)| {
            let status = if failed { "JS_FAILED" } else { "JS_SUCCESS" };
            Step::Event(Event::JobEnded { identity: PEOPLE[w].0.into(), status: status.into() })
        }),
        1 => ((1u64..4), prop::option::of((1u128..4).prop_map(TransferId::new))).prop_map(|(n, t)| {
            Step::Event(Event::RecoveryBundle { recovery: format!("r-{n}"), bundle: t.map(|t| (t, 500)) })
        }),
        5 => prop_oneof![0u64..500, 0u64..5_000, 0u64..30_000].prop_map(Step::Advance),
    ]
}

fn scenario() -> impl Strategy<Value = (Vec<Participant>, Vec<Step>)> {
    let initial = prop::collection::vec((person(), audio()), 0..4)
        .prop_map(|v| v.into_iter().map(|(w, a)| participant(w, a, None)).collect());
    (initial, prop::collection::vec(step(), 1..80))
}

fn ctl(from: &str, message: AgentMessage) -> Step {
    Step::Event(Event::Control { from: from.into(), id: "m-s".into(), message })
}

/// The happy path of a cold handoff, which random events then disturb.
fn skeleton() -> Vec<Step> {
    let hello = |name: &str| AgentMessage::Hello { agent_name: name.into(), role: None, heartbeat_ms: None };
    vec![
        Step::Event(Event::ParticipantJoined(participant(0, Some(false), None))),
        Step::Event(Event::ParticipantJoined(participant(2, Some(false), None))),
        ctl("agent-triage", hello("triage")),
        ctl(
            "agent-triage",
            AgentMessage::Handoff {
                target: "billing".into(),
                reason: "r".into(),
                transfer: Some(TransferId::new(1)),
                bundle_follows: false,
                quiet: false,
                quiet_ms: None,
                filler: true,
                speaking: true,
            },
        ),
        Step::Event(Event::BundleReceived {
            from: "agent-triage".into(),
            transfer_id: TransferId::new(1),
            bytes: 9,
        }),
        Step::Advance(200),
        ctl(
            "agent-triage",
            AgentMessage::Tail {
                handoff: "h-1".into(),
                items: vec![serde_json::json!({"id": "item_9"})],
                user_state: None,
            },
        ),
        ctl("agent-triage", AgentMessage::Quiet { handoff: None, quiet_ms: Some(80) }),
        Step::Event(Event::ParticipantJoined(participant(3, Some(false), None))),
        ctl("agent-billing", hello("billing")),
        Step::Event(Event::BundleDelivered { to: "agent-billing".into(), transfer_id: TransferId::new(1) }),
        ctl("agent-billing", AgentMessage::Ready { handoff: "h-1".into() }),
        Step::Event(Event::SpeakingChanged { identity: "agent-billing".into(), speaking: true }),
        Step::Advance(10_000),
    ]
}

/// The skeleton with random steps inserted at random places.
fn disturbed() -> impl Strategy<Value = (Vec<Participant>, Vec<Step>)> {
    prop::collection::vec((0usize..14, step()), 0..12).prop_map(|noise| {
        let mut steps = skeleton();
        let mut noise = noise;
        // Insert from the back so earlier positions stay meaningful.
        noise.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
        for (at, s) in noise {
            steps.insert(at.min(steps.len()), s);
        }
        (Vec::new(), steps)
    })
}

/// What the room looks like after executing the arbiter's commands.
struct Model {
    policy: Policy,
    present: BTreeMap<String, Participant>,
    active: BTreeSet<String>,
    /// Present participants the arbiter was told are speaking.
    speaking: BTreeSet<String>,
    /// baton's track is unmuted.
    armed: bool,
    filler_since: Option<Instant>,
    /// When each handoff was requested (its timeline's zero).
    requested: BTreeMap<String, Instant>,
    /// Whether a handoff was under way after the previous step, and when the last one ended.
    in_handoff: bool,
    handoff_ended: Option<Instant>,
    /// A recovery failed and its filler plays out its hold with nobody holding the floor.
    vacant_hold: bool,
    /// The sender of the control message being handled, and whether it was a `handoff` asking
    /// for a filler of its own.
    asking: Option<(String, bool)>,
    /// Handoffs accepted from a source that plays its own filler: handoff id → source.
    source_fillers: BTreeMap<String, String>,
    /// The handoffs whose source was told `filler_stop`.
    source_fillers_stopped: BTreeSet<String>,
}

#[derive(Default, Debug)]
struct Coverage {
    cases: usize,
    completed: usize,
    handed_back: usize,
    failed: usize,
    cleared: usize,
    recoveries: usize,
    recoveries_failed: usize,
    alternates: usize,
    forced_mutes: usize,
    filler_limit: usize,
    /// Holds that ended because the new holder was heard, and because `filler_hold` ran out.
    holds_heard: usize,
    holds_expired: usize,
}

impl Model {
    fn configured(&self, p: &Participant) -> bool {
        p.kind == ParticipantKind::Agent
            && p.agent_name.as_ref().is_some_and(|n| self.policy.agents.contains(n))
    }

    fn observe(&mut self, e: &Event) {
        self.asking = match e {
            Event::Control { from, message: AgentMessage::Handoff { filler, .. }, .. } => {
                Some((from.clone(), *filler))
            }
            Event::Control { from, .. } => Some((from.clone(), false)),
            _ => None,
        };
        match e {
            Event::RoomJoined { participants, .. } => {
                for p in participants {
                    self.present.insert(p.identity.clone(), p.clone());
                }
            }
            Event::ParticipantJoined(p) | Event::ParticipantUpdated(p) => {
                // The arbiter starts a participant it did not know as not speaking.
                let new = self.present.insert(p.identity.clone(), p.clone()).is_none();
                if new {
                    self.speaking.remove(&p.identity);
                }
            }
            Event::ParticipantLeft { identity } => {
                self.present.remove(identity);
                self.active.remove(identity);
                self.speaking.remove(identity);
            }
            Event::SpeakingChanged { identity, speaking } if self.present.contains_key(identity) => {
                if *speaking {
                    self.speaking.insert(identity.clone());
                } else {
                    self.speaking.remove(identity);
                }
            }
            _ => {}
        }
    }

    fn execute(&mut self, cmds: &[Command], now: Instant, cov: &mut Coverage) -> Result<(), TestCaseError> {
        // Every fade-out comes with a `filler_off` mark at this very instant, and vice versa.
        let fades = cmds.iter().filter(|c| matches!(c, Command::Filler(FillerCommand::FadeOut(_)))).count();
        let marks = cmds
            .iter()
            .filter(|c| matches!(c, Command::Timeline(ev) if ev.mark.phase == Phase::FillerOff))
            .count();
        prop_assert_eq!(fades, marks, "fade-outs and filler_off marks differ: {:?}", cmds);
        for c in cmds {
            match c {
                Command::Send { to, message, .. } => {
                    let p = self.present.get(to);
                    prop_assert!(
                        p.is_some_and(|p| p.kind == ParticipantKind::Agent),
                        "control message to a non-agent or absent participant {to}: {message:?}"
                    );
                    match message {
                        BatonMessage::HandoffAccepted { handoff, .. }
                            if self.asking.as_ref().is_some_and(|(from, filler)| from == to && *filler) =>
                        {
                            self.source_fillers.entry(handoff.clone()).or_insert_with(|| to.clone());
                        }
                        BatonMessage::FillerStop { handoff, .. } => {
                            prop_assert_eq!(
                                self.source_fillers.get(handoff),
                                Some(to),
                                "filler_stop to a participant that is not the source of {} with a filler",
                                handoff
                            );
                            prop_assert!(
                                self.source_fillers_stopped.insert(handoff.clone()),
                                "filler_stop sent twice for {}",
                                handoff
                            );
                        }
                        BatonMessage::Activate { .. } => {
                            prop_assert!(self.configured(p.unwrap()), "activated an unconfigured agent");
                            self.active.insert(to.clone());
                        }
                        BatonMessage::Deactivate { .. }
                        | BatonMessage::HandoffCancelled { .. }
                        | BatonMessage::Release { .. } => {
                            self.active.remove(to);
                        }
                        _ => {}
                    }
                }
                Command::MuteTrack { identity, track_sid } | Command::UnmuteTrack { identity, track_sid } => {
                    let unmute = matches!(c, Command::UnmuteTrack { .. });
                    let track = self
                        .present
                        .get_mut(identity)
                        .and_then(|p| p.audio.as_mut())
                        .filter(|a| &a.sid == track_sid);
                    prop_assert!(track.is_some(), "mute/unmute of a track that is not there: {c:?}");
                    track.unwrap().muted = !unmute;
                }
                Command::Filler(FillerCommand::Arm) => {
                    prop_assert!(!self.armed, "armed twice");
                    self.armed = true;
                }
                Command::Filler(FillerCommand::On) => {
                    prop_assert!(self.armed, "filler on before the track was armed");
                    prop_assert!(self.filler_since.is_none(), "filler started twice");
                    self.filler_since = Some(now);
                }
                Command::Filler(FillerCommand::FadeOut(fade)) => {
                    prop_assert!(self.filler_since.is_some(), "filler stopped while off");
                    self.filler_since = None;
                    self.vacant_hold = false;
                    if *fade == self.policy.filler_tail {
                        cov.holds_heard += 1;
                    }
                }
                Command::Filler(FillerCommand::Off) => {
                    prop_assert!(self.armed, "disarmed twice");
                    prop_assert!(self.filler_since.is_none(), "track muted under a playing filler");
                    self.armed = false;
                }
                Command::Alert(Alert::RecoveryFailed { .. }) => {
                    // Nobody could take over from a crashed holder: the filler's hold runs out
                    // with nobody holding the floor.
                    cov.recoveries_failed += 1;
                    self.vacant_hold = self.filler_since.is_some();
                }
                Command::HandoffFinished(t) => {
                    if t.kind == Kind::Recovery {
                        cov.recoveries += 1;
                    }
                    match t.outcome {
                        Some(Outcome::Completed) => cov.completed += 1,
                        Some(Outcome::HandedBack) => cov.handed_back += 1,
                        Some(Outcome::Failed) => cov.failed += 1,
                        Some(Outcome::Cleared) => cov.cleared += 1,
                        None => prop_assert!(false, "finished timeline without outcome"),
                    }
                    prop_assert!(self.filler_since.is_none(), "timeline closed while the filler plays");
                    let on = t.phases.iter().position(|m| m.phase == Phase::FillerOn);
                    let off = t.phases.iter().position(|m| m.phase == Phase::FillerOff);
                    prop_assert_eq!(on.is_some(), off.is_some(), "filler_on without filler_off: {:?}", t);
                    prop_assert!(on <= off, "filler_off before filler_on: {:?}", t);
                }
                Command::Timeline(ev) => match (ev.mark.phase, ev.mark.detail.as_deref()) {
                    (Phase::Requested | Phase::Suspected, _) => {
                        // A recovery's times count from the crashed agent's last heartbeat.
                        let origin = now - std::time::Duration::from_millis(ev.mark.ms);
                        self.requested.insert(ev.handoff.clone(), origin);
                    }
                    (Phase::AlternateTried, _) => cov.alternates += 1,
                    (Phase::SourceQuiet, Some("forced")) => cov.forced_mutes += 1,
                    (Phase::Failed | Phase::HandedBack, Some("filler_limit")) => cov.filler_limit += 1,
                    (Phase::FillerOff, detail) => {
                        if detail == Some("hold_limit") {
                            cov.holds_expired += 1;
                        }
                        let since = self.requested.get(&ev.handoff).copied();
                        prop_assert!(since.is_some(), "filler_off of an unknown handoff: {:?}", ev);
                        let ms = now.duration_since(since.unwrap()).as_millis() as u64;
                        prop_assert_eq!(ev.mark.ms, ms, "filler_off not marked when the filler stopped");
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        Ok(())
    }

    fn note_handoff(&mut self, arb: &Arbiter, now: Instant) {
        let in_handoff = arb.handoff().is_some();
        if self.in_handoff && !in_handoff {
            self.handoff_ended = Some(now);
        }
        self.in_handoff = in_handoff;
    }

    fn check(&self, arb: &Arbiter, now: Instant) -> Result<(), TestCaseError> {
        if arb.is_ended() {
            // The caller is gone and baton leaves the room: nothing left to arbitrate.
            prop_assert!(self.filler_since.is_none(), "filler left playing after the session ended");
            prop_assert!(!self.armed, "baton's track left unmuted after the session ended");
            prop_assert!(arb.poll_timeout().is_none());
            return Ok(());
        }
        let audible: Vec<&String> = self
            .present
            .values()
            .filter(|p| self.configured(p))
            .filter(|p| p.audio_live() || self.active.contains(&p.identity))
            .map(|p| &p.identity)
            .collect();
        prop_assert!(audible.len() <= 1, "two agents audible: {audible:?}");
        prop_assert!(self.active.len() <= 1, "two agents active: {:?}", self.active);
        prop_assert_eq!(self.filler_since.is_some(), arb.filler_on());
        if arb.handoff().is_some() {
            prop_assert!(self.armed, "a handoff under way without baton's track armed");
            if audible.is_empty() {
                prop_assert!(self.filler_since.is_some(), "handoff with nobody audible and no filler");
            }
            if let Some(since) = self.filler_since {
                prop_assert!(
                    now.duration_since(since) <= self.policy.max_filler,
                    "filler ran {:?}",
                    now.duration_since(since)
                );
            }
        } else if self.filler_since.is_some() {
            // The hold: the floor changed hands and the caller cannot hear the new holder yet.
            let holder = arb.floor_holder();
            prop_assert!(
                holder.is_some() || self.vacant_hold,
                "filler playing outside a handoff with nobody holding the floor"
            );
            prop_assert!(
                holder.is_none_or(|h| !self.speaking.contains(h)),
                "filler still playing while the new holder {holder:?} is heard"
            );
            let ended = self.handoff_ended.unwrap_or(now);
            prop_assert!(
                now.duration_since(ended) <= self.policy.filler_hold,
                "filler held {:?} after the handoff ended",
                now.duration_since(ended)
            );
        } else {
            prop_assert!(!self.armed, "baton's track left unmuted with no handoff and no filler");
        }
        Ok(())
    }
}

fn run(initial: Vec<Participant>, steps: Vec<Step>, cov: &mut Coverage) -> Result<(), TestCaseError> {
    let t0 = Instant::now();
    let mut now = t0;
    let mut arb = Arbiter::new(policy(), t0).unwrap();
    let mut model = Model {
        policy: policy(),
        present: BTreeMap::new(),
        active: BTreeSet::new(),
        speaking: BTreeSet::new(),
        armed: false,
        filler_since: None,
        requested: BTreeMap::new(),
        in_handoff: false,
        handoff_ended: None,
        vacant_hold: false,
        asking: None,
        source_fillers: BTreeMap::new(),
        source_fillers_stopped: BTreeSet::new(),
    };
    let first = Event::RoomJoined { participants: initial, token_dispatched: vec![] };
    let mut queue = vec![Step::Event(first)];
    queue.extend(steps);
    for step in queue {
        match step {
            Step::Event(e) => {
                model.observe(&e);
                arb.handle(e, now);
                let cmds = arb.drain_commands();
                model.execute(&cmds, now, cov)?;
                model.note_handoff(&arb, now);
                model.check(&arb, now)?;
            }
            Step::Advance(ms) => {
                let end = now + Duration::from_millis(ms);
                while let Some(at) = arb.poll_timeout() {
                    if at > end {
                        break;
                    }
                    prop_assert!(at >= now, "deadline in the past: {:?} before now", now - at);
                    now = at;
                    arb.handle_timeout(now);
                    let cmds = arb.drain_commands();
                    model.execute(&cmds, now, cov)?;
                    model.note_handoff(&arb, now);
                    model.check(&arb, now)?;
                    prop_assert!(arb.poll_timeout().is_none_or(|next| next > now), "timeout not consumed");
                }
                now = end;
                model.check(&arb, now)?;
            }
        }
    }
    Ok(())
}

/// Runs the model over cases drawn from `strategy` (600, or `BATON_PROPTEST_CASES`) and returns
/// what they reached; panics with proptest's shrunk counterexample if a property fails.
/// Deterministic by default so the coverage floor cannot flake; `BATON_PROPTEST_RANDOM=1`
/// explores fresh seeds.
fn check(strategy: impl Strategy<Value = (Vec<Participant>, Vec<Step>)>) -> Coverage {
    let cases = std::env::var("BATON_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut runner = if std::env::var_os("BATON_PROPTEST_RANDOM").is_some() {
        TestRunner::new(config)
    } else {
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
    };
    let cov = std::cell::RefCell::new(Coverage::default());
    let result = runner.run(&strategy, |(initial, steps)| {
        let mut cov = cov.borrow_mut();
        cov.cases += 1;
        run(initial, steps, &mut cov)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let cov = cov.into_inner();
    eprintln!("coverage: {cov:?}");
    cov
}

#[test]
fn disturbed_happy_paths_keep_one_voice_and_bounded_filler() {
    let cov = check(disturbed());
    // Most disturbances leave the handoff intact; some must break it; both ends of the hold occur.
    assert!(cov.completed > cov.cases / 4, "{cov:?}");
    assert!(cov.handed_back + cov.failed > 0, "{cov:?}");
    assert!(cov.holds_heard > cov.cases / 4, "{cov:?}");
    assert!(cov.holds_expired > 0, "{cov:?}");
}

#[test]
fn random_event_sequences_keep_one_voice_and_bounded_filler() {
    let cov = check(scenario());
    // A property that never reaches the interesting states proves nothing: require that the
    // random runs did hand back, fail, try alternates, force mutes and hit the filler limit
    // (completions are rare here; the disturbed happy paths cover them).
    assert!(cov.handed_back > 0, "{cov:?}");
    assert!(cov.failed > 0, "{cov:?}");
    assert!(cov.recoveries > 0 && cov.recoveries_failed > 0, "{cov:?}");
    assert!(cov.alternates > 0, "{cov:?}");
    assert!(cov.forced_mutes > 0, "{cov:?}");
    assert!(cov.filler_limit > 0, "{cov:?}");
}
