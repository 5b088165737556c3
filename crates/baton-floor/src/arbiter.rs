//! The floor arbiter: one per room, events in, commands out, time passed in.
//!
//! The floor is held by at most one agent. A handoff takes it away from the source, covers the
//! gap with filler, and gives it to the target once the target has the context and is ready; on
//! any failure the floor goes back to the source (or to an alternate) before the filler limit.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use baton_transfer::TransferId;

use crate::command::{
    ActivateCause, Alert, BatonMessage, Command, DeactivateReason, FailReason, FillerCommand,
    MAX_CONTROL_MESSAGE, RefuseReason, SecurityEvent, SecurityReason,
};
use crate::dispatch::{Dispatcher, GaveUp, Purpose};
use crate::event::{AgentMessage, Event, Participant, ParticipantKind, ToolCallStatus};
use crate::policy::{Policy, PolicyError, ReleasePolicy, StandbyFrom};
use crate::timeline::{Kind, Outcome, Phase, Timeline};

#[derive(Debug, Clone)]
struct Peer {
    info: Participant,
    /// The adapter said something, so it is listening; messages sent before that could be lost.
    reachable: bool,
    speaking: bool,
    /// The heartbeat period announced in `hello`, and when the last heartbeat (or that hello)
    /// arrived. None: the adapter does not send heartbeats.
    heartbeat: Option<(Duration, Instant)>,
}

#[derive(Debug, Clone)]
struct Holder {
    identity: String,
    /// Whether `activate` was sent; waits for the agent to be reachable.
    activated: bool,
    /// The `activate` that gave it the floor: sent again, unchanged, when its adapter restarts
    /// and says `hello` again, so the agent still knows why it holds the floor.
    activation: BatonMessage,
}

impl Holder {
    fn at_start(identity: String) -> Self {
        let activation = BatonMessage::Activate { handoff: None, cause: ActivateCause::Start, reason: None };
        Holder { identity, activated: false, activation }
    }
}

#[derive(Debug, Clone)]
struct Target {
    name: String,
    identity: Option<String>,
    dispatching: bool,
    prepared: bool,
    ready: bool,
    ready_deadline: Option<Instant>,
    /// The dispatch it came from (`lk.agent.dispatch_id`), when it was dispatched for this
    /// handoff: a participant from the same dispatch that joins under another identity is the
    /// same target rejoining.
    dispatch_id: Option<String>,
    /// It left the room; it keeps the role if it joins again before this (`rejoin_grace`).
    away_until: Option<Instant>,
    /// However the delivery to it moves, neither its `ready_deadline` nor the delivery's
    /// stall deadline is pushed past this (`max_transfer_time` from its join).
    transfer_cap: Option<Instant>,
    /// It was sent `activate` while the settle still ran (ready before the source's last words
    /// had reached the caller): it starts its reply now, its track stays muted until the
    /// settle is over.
    activated: bool,
}

impl Target {
    fn new(name: String) -> Target {
        Target {
            name,
            identity: None,
            dispatching: false,
            prepared: false,
            ready: false,
            ready_deadline: None,
            dispatch_id: None,
            away_until: None,
            transfer_cap: None,
            activated: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Bundle {
    /// The source said there is a bundle.
    expected: bool,
    transfer: Option<TransferId>,
    held: bool,
    delivering: bool,
    delivered: bool,
    /// The source left before baton held the bundle.
    lost: bool,
    deadline: Option<Instant>,
    /// Bytes of the upload baton holds so far ([`Event::TransferProgress`]).
    uploaded: u64,
    /// However the upload moves, `deadline` stays before this (`max_transfer_time`).
    upload_cap: Option<Instant>,
    /// Bytes of the delivery the target acknowledged so far.
    acknowledged: u64,
    /// Once the delivery has made progress: it fails if it makes none until this.
    delivery_stall: Option<Instant>,
}

impl Bundle {
    /// Nothing more to wait for on the bundle before the target may take the floor.
    fn settled(&self) -> bool {
        !self.expected || self.delivered || self.lost
    }
}

#[derive(Debug, Clone)]
struct Handoff {
    id: String,
    source: String,
    source_name: String,
    source_present: bool,
    /// The source left the room; it keeps the role if it joins again before this
    /// (`rejoin_grace`).
    source_away_until: Option<Instant>,
    reason: String,
    alternates: VecDeque<String>,
    target: Target,
    quiet: bool,
    quiet_deadline: Option<Instant>,
    /// The target may not be switched in before this: set when the source was silenced by the
    /// server mute rather than by its own word, because its audio already in flight keeps playing
    /// at the caller for a few frames after the mute.
    settle_until: Option<Instant>,
    grace_deadline: Option<Instant>,
    filler_deadline: Option<Instant>,
    bundle: Bundle,
    timeline: Timeline,
    /// Late tool results for the target, held until it has been sent `prepare`.
    tool_results: Vec<BatonMessage>,
    /// The source's `tail` messages, in order: each target is sent them all right after its
    /// `prepare` (an alternate too), and the prepared target as they come.
    tails: Vec<BatonMessage>,
    /// The source's request said `speaking` and it has not been seen speaking since: silence
    /// now is the sentence not started yet, not its end, so `silence_grace` does not run.
    sentence_pending: bool,
    /// Targets that failed in this handoff and are still in the room: not chosen again.
    failed_targets: Vec<String>,
    /// How many more times a target of this agent name that crashes while being prepared is
    /// replaced by another of the same name (`recovery_attempts`).
    replacements_left: u32,
    /// Set when this is not a handoff but the recovery of a crashed floor holder: `source` is
    /// the crashed identity, `source_name` its agent name, the target its replacement.
    recovery: Option<Recovery>,
}

/// What a recovery adds to the [`Handoff`] machinery it runs on (docs/protocol.md, "Checkpoints,
/// heartbeats and recovery"): the holder as it was, and how sure baton is that it crashed.
#[derive(Debug, Clone)]
struct Recovery {
    /// The holder before the suspicion: it gets the floor back, unchanged, if the suspicion
    /// clears. None when nobody held the floor (a late agent taking over a vacant call).
    holder: Option<Holder>,
    /// The crash is certain: the holder was declared crashed and a replacement is acquired.
    confirmed: bool,
    /// If nothing confirms or clears the suspicion first, it is confirmed at this instant
    /// (`crash_confirm_after` past the last heartbeat).
    confirm_at: Instant,
    /// However the replacements go, the recovery fails at this instant: `max_filler` past the
    /// suspicion, the longest a caller hears the filler in one go.
    give_up_at: Instant,
    /// While unconfirmed, the server is asked for the job's status again at this instant.
    check_job_at: Option<Instant>,
}

/// How often a suspected agent's job status is read again until the crash is confirmed or
/// cleared: the server learns of the job's end when the agent's worker reports it.
const JOB_CHECK_EVERY: Duration = Duration::from_millis(250);

/// A handoff that is over and whose timeline is still open: it closes once the new holder has
/// been heard (or given up on) and the filler has stopped, so its marks say when things really
/// happened.
#[derive(Debug, Clone)]
struct Finishing {
    timeline: Timeline,
    /// For a completed handoff: its target, and until when baton waits to hear it
    /// (`audible_timeout`).
    awaiting: Option<(String, Instant)>,
}

/// baton's filler track, as the arbiter has commanded it.
#[derive(Debug, Clone, Default)]
struct FillerState {
    /// The track is unmuted ([`FillerCommand::Arm`]).
    armed: bool,
    /// The filler plays (a fade-out under way does not count).
    on: bool,
    /// The floor changed hands while the filler played: it plays on until this agent is heard,
    /// at most until this instant (`filler_hold`).
    hold: Option<(String, Instant)>,
    /// A handoff source that said it plays a filler of its own (`filler` in its request):
    /// its identity and the handoff id. It is told `filler_stop` when baton's filler stops.
    source: Option<(String, String)>,
}

/// A read-only view of the handoff under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffStatus {
    /// The handoff id.
    pub id: String,
    /// The source's identity.
    pub source: String,
    /// The agent name currently being tried.
    pub target_name: String,
    /// The target's identity, once it is in the room.
    pub target_identity: Option<String>,
    /// Whether the source has gone quiet (filler is on from then).
    pub source_quiet: bool,
    /// Whether the target sent `ready`.
    pub target_ready: bool,
    /// Whether the target acknowledged the bundle.
    pub bundle_delivered: bool,
    /// A handoff, or the recovery of a crashed floor holder (`source` is then the crashed
    /// identity, `target_name` the agent name of its replacement).
    pub kind: Kind,
    /// For a recovery: whether the crash is confirmed (before that, it is only suspected and
    /// may clear).
    pub confirmed: bool,
}

/// How long the filler alone covers the gap after a source is force-muted, before the target is
/// switched in: about what a caller's jitter buffer still holds of the muted source.
const MUTE_SETTLE: Duration = Duration::from_millis(300);

enum Due {
    Dispatch,
    Settle,
    FillerLimit,
    SourceQuiet,
    SilenceGrace,
    Bundle,
    DeliveryStall,
    Ready,
    SourceAway,
    TargetAway,
    Audible,
    FillerHold,
    Release(String),
    /// The floor holder's heartbeat gap reached `crash_suspect_after`.
    Suspect,
    /// A suspected holder stayed silent until `crash_confirm_after`.
    Confirm,
    /// The handoff target's heartbeat gap reached `crash_confirm_after`.
    TargetCrashed,
    /// A recovery reached `max_filler`.
    RecoveryLimit,
    /// The hint for this agent name ran out (`hint_timeout`).
    HintExpired(String),
    /// This idle standby's heartbeat gap reached `crash_confirm_after`.
    StandbyCrashed(String),
    /// Time to read a suspected agent's job status again.
    CheckJob,
}

/// The floor arbiter for one room (the crate docs show a shell driving it).
///
/// Its methods are of three kinds. Getters change nothing: [`floor_holder`](Self::floor_holder),
/// [`handoff`](Self::handoff), [`filler_on`](Self::filler_on), [`is_ended`](Self::is_ended).
/// `handle_*` are the only mutations: [`handle`](Self::handle) takes one [`Event`],
/// [`handle_timeout`](Self::handle_timeout) fires the deadlines that have passed; both take the
/// current time, which moves only through them. `poll_*` hand out what the mutations produced:
/// [`poll_command`](Self::poll_command) (or [`drain_commands`](Self::drain_commands)) the
/// commands, to execute in that order, then [`poll_timeout`](Self::poll_timeout) the next
/// deadline.
///
/// After any mutation, poll until you get the timeout: take every command, then ask
/// `poll_timeout` when to call `handle_timeout` next (or earlier, with the next event).
#[derive(Debug)]
pub struct Arbiter {
    policy: Policy,
    peers: BTreeMap<String, Peer>,
    holder: Option<Holder>,
    handoff: Option<Handoff>,
    finishing: Option<Finishing>,
    dispatcher: Dispatcher,
    /// Complete bundles baton holds that no handoff has claimed yet (transfer id, sender),
    /// oldest first; at most [`HELD_BUNDLES_MAX`].
    held_bundles: VecDeque<(TransferId, String)>,
    /// Released sources and when they are removed if still present.
    releases: BTreeMap<String, Instant>,
    callers_seen: bool,
    ended: bool,
    room_joined: bool,
    next_handoff: u64,
    /// Handoff requests accepted lately, newest last, at most [`ACCEPTED_REQUESTS_KEPT`]: a
    /// request repeated with the same `id` (a resend after a reconnect) gets the same answer.
    accepted_requests: VecDeque<AcceptedRequest>,
    /// `(handoff, call_id)` of the tool results forwarded lately, at most
    /// [`FORWARDED_RESULTS_KEPT`]: each is forwarded once.
    forwarded_results: VecDeque<(String, String)>,
    filler: FillerState,
    /// Identities declared crashed: never given a role again, their messages ignored, also
    /// after they left (a process that only froze may come back under the same identity).
    /// One entry per crash in the call.
    crashed: BTreeSet<String>,
    next_recovery: u64,
    /// The agent name of a crashed holder no replacement could take over from: an agent of
    /// that name that joins later (a job restarted by LiveKit Cloud, a late worker) is given
    /// the call with the last checkpoint.
    vacated_by: Option<String>,
    /// Standbys baton dispatched (for `standby` or a hint), identity -> agent name: the only
    /// idle agents baton removes when they are no longer wanted.
    standbys: BTreeMap<String, String>,
    /// Standby dispatches so far per agent name, bounded by [`STANDBY_DISPATCHES_PER_SLOT`].
    standby_dispatches: BTreeMap<String, u32>,
    next_standby: u64,
    /// Open hints: agent name -> when the hint runs out (`hint_timeout`).
    hints: BTreeMap<String, Instant>,
    /// When each sender's last hint was accepted (`hint_interval`).
    last_hint: BTreeMap<String, Instant>,
    out: VecDeque<Command>,
}

/// How often one standby place of an agent (its `standby` count, or 1 for a hint) may be
/// dispatched in one call: a standby that crashes is replaced, one that keeps crashing (a broken
/// worker) is not replaced forever.
const STANDBY_DISPATCHES_PER_SLOT: u32 = 3;

/// How many accepted handoff requests the arbiter remembers for answering a repeat: a room has
/// a handful of handoffs, and a resend follows its original within seconds.
const ACCEPTED_REQUESTS_KEPT: usize = 16;

/// How many complete bundles no handoff has claimed baton keeps ids of (a source's upload that
/// overtook its request, a failed handoff's bundle for a retry); the oldest goes first.
const HELD_BUNDLES_MAX: usize = 16;

/// How many forwarded tool results the arbiter remembers to drop a repeat: far more than the
/// calls a few handoffs carry in flight.
const FORWARDED_RESULTS_KEPT: usize = 256;

/// How many `tail` messages one handoff keeps (each at most one 15 000-byte packet, so at most
/// about 1 MB): a sentence and the caller's words meanwhile take one or two; more is a source
/// gone wrong, whose further tails are dropped (logged) rather than held without bound.
pub const MAX_TAILS_PER_HANDOFF: usize = 64;

/// Bounds on an announced heartbeat period (`hello.heartbeat_ms`), so a hostile or buggy value
/// can neither flood the arbiter's bookkeeping nor make a dead agent look alive for minutes.
const MIN_HEARTBEAT_MS: u32 = 50;
const MAX_HEARTBEAT_MS: u32 = 10_000;

/// The members of an agent's `tool_result`.
#[derive(Debug)]
struct ToolResult {
    handoff: String,
    call_id: String,
    name: String,
    status: ToolCallStatus,
    is_error: bool,
    output: String,
    truncated: bool,
}

/// A forwarded `tool_result` cut to fit one data packet: `output` shortened at a character
/// boundary and `truncated` set, as the sending adapter does (docs/protocol.md, `tool_result`,
/// "Size"). `None` if it cannot fit even with an empty `output`.
fn fit_tool_result(mut message: BatonMessage) -> Option<BatonMessage> {
    loop {
        let excess = message.envelope_len(None).saturating_sub(MAX_CONTROL_MESSAGE);
        if excess == 0 {
            return Some(message);
        }
        let BatonMessage::ToolResult { output, truncated, .. } = &mut message else {
            return None;
        };
        if output.is_empty() {
            return None;
        }
        // Every byte of `output` takes at least one byte encoded: one cut usually does.
        let mut keep = output.len().saturating_sub(excess);
        while !output.is_char_boundary(keep) {
            keep -= 1;
        }
        output.truncate(keep);
        *truncated = true;
    }
}

/// What a `handoff` request asks (its message, `quiet` already turned into how long ago).
struct Request {
    target: String,
    reason: String,
    transfer: Option<TransferId>,
    bundle_follows: bool,
    /// The source is quiet, since this long before the request.
    quiet: Option<Duration>,
    /// The source plays a filler of its own until `filler_stop`.
    filler: bool,
    /// The source asked at the start of its sentence and will say `quiet` itself.
    speaking: bool,
}

/// A `handoff` request baton accepted: who sent it with which message id, and the answer.
#[derive(Debug, Clone)]
struct AcceptedRequest {
    from: String,
    msg_id: String,
    handoff: String,
    target: String,
}

impl Arbiter {
    /// A new arbiter for one room. `now` is accepted for symmetry with the rest of the API; the
    /// arbiter does nothing until [`Event::RoomJoined`].
    pub fn new(policy: Policy, now: Instant) -> Result<Arbiter, PolicyError> {
        let _ = now;
        policy.validate()?;
        Ok(Arbiter {
            dispatcher: Dispatcher::new(policy.join_timeout),
            policy,
            peers: BTreeMap::new(),
            holder: None,
            handoff: None,
            finishing: None,
            held_bundles: VecDeque::new(),
            releases: BTreeMap::new(),
            callers_seen: false,
            ended: false,
            room_joined: false,
            next_handoff: 1,
            accepted_requests: VecDeque::new(),
            forwarded_results: VecDeque::new(),
            filler: FillerState::default(),
            crashed: BTreeSet::new(),
            next_recovery: 1,
            vacated_by: None,
            standbys: BTreeMap::new(),
            standby_dispatches: BTreeMap::new(),
            next_standby: 1,
            hints: BTreeMap::new(),
            last_hint: BTreeMap::new(),
            out: VecDeque::new(),
        })
    }

    /// The next command to execute, in order; call until `None` after every `handle*`.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    /// Drains every pending command.
    pub fn drain_commands(&mut self) -> Vec<Command> {
        self.out.drain(..).collect()
    }

    /// When [`Arbiter::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines().into_iter().map(|(at, _)| at).min()
    }

    /// The heartbeat period `identity` announced in `hello` (clamped to 50 ms..10 s) and when its
    /// last heartbeat (or that hello) arrived; None when it announced none or is not in the room.
    /// A gap of `crash_suspect_after` in the floor holder's heartbeats makes it suspected of a
    /// crash.
    pub fn heartbeat(&self, identity: &str) -> Option<(Duration, Instant)> {
        self.peers.get(identity).and_then(|p| p.heartbeat)
    }

    /// The agent holding the floor (activated or waiting for its `hello`), if any.
    pub fn floor_holder(&self) -> Option<&str> {
        self.holder.as_ref().map(|h| h.identity.as_str())
    }

    /// Gives the floor to `identity` before [`Event::RoomJoined`], for a baton that comes back
    /// to a room whose state it kept (issue 14): the floor is the room's, not the policy's
    /// starting agent's. The agent is activated (cause `start`, which an adapter that holds the
    /// floor already ignores) and unmuted once it says `hello`; every other configured agent is
    /// muted as usual. Ignored once the room was joined, or when `identity` is not a configured
    /// agent present in `participants` (an agent that left meanwhile does not hold the floor).
    pub fn restore_holder(&mut self, identity: &str, participants: &[Participant]) -> bool {
        if self.room_joined || self.holder.is_some() {
            return false;
        }
        if !participants.iter().any(|p| p.identity == identity && self.is_managed(p)) {
            return false;
        }
        self.holder = Some(Holder::at_start(identity.to_owned()));
        true
    }

    /// The handoff under way, if any.
    pub fn handoff(&self) -> Option<HandoffStatus> {
        self.handoff.as_ref().map(|h| HandoffStatus {
            id: h.id.clone(),
            source: h.source.clone(),
            target_name: h.target.name.clone(),
            target_identity: h.target.identity.clone(),
            source_quiet: h.quiet,
            target_ready: h.target.ready,
            bundle_delivered: h.bundle.delivered,
            kind: h.timeline.kind,
            confirmed: h.recovery.as_ref().is_some_and(|r| r.confirmed),
        })
    }

    /// Whether baton's filler is playing (not counting a fade-out in progress).
    pub fn filler_on(&self) -> bool {
        self.filler.on
    }

    /// Whether the session is over; the arbiter ignores everything from then on.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Feeds one event.
    pub fn handle(&mut self, event: Event, now: Instant) {
        if self.ended {
            return;
        }
        match event {
            Event::RoomJoined { participants, token_dispatched } => {
                self.on_room_joined(participants, token_dispatched, now)
            }
            Event::ParticipantJoined(p) | Event::ParticipantUpdated(p) => self.on_participant(p, now),
            Event::ParticipantLeft { identity } => self.on_left(&identity, now),
            Event::SpeakingChanged { identity, speaking } => self.on_speaking(&identity, speaking, now),
            Event::Control { from, id, message } => self.on_control(from, id, message, now),
            Event::BundleReceived { from, transfer_id, bytes } => {
                self.on_bundle_received(from, transfer_id, bytes, now)
            }
            Event::BundleDelivered { to, transfer_id } => self.on_bundle_delivered(&to, transfer_id, now),
            Event::TransferProgress { peer, transfer_id, bytes } => {
                self.on_transfer_progress(&peer, transfer_id, bytes, now)
            }
            Event::TransferFailed { peer, transfer_id, .. } => {
                self.on_transfer_failed(&peer, transfer_id, now)
            }
            Event::DispatchCreated { ticket, dispatch_id } => {
                self.dispatcher.created(ticket, dispatch_id, &mut self.out)
            }
            Event::DispatchFailed { ticket, error } => {
                if let Some(g) = self.dispatcher.failed(ticket, error, now, &mut self.out) {
                    self.on_gave_up(g, now);
                }
            }
            Event::RecoveryBundle { recovery, bundle } => self.on_recovery_bundle(&recovery, bundle, now),
            Event::JobEnded { identity, status } => self.on_job_ended(&identity, &status, now),
        }
        self.settle(now);
    }

    /// Fires every deadline at or before `now`, earliest first.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        while let Some((_, due)) =
            self.deadlines().into_iter().filter(|(at, _)| *at <= now).min_by_key(|(at, _)| *at)
        {
            self.fire(due, now);
            if self.ended {
                return;
            }
        }
        self.settle(now);
    }

    fn deadlines(&self) -> Vec<(Instant, Due)> {
        let mut d = Vec::new();
        if self.ended {
            return d;
        }
        if let Some(at) = self.dispatcher.next_deadline() {
            d.push((at, Due::Dispatch));
        }
        match (&self.handoff, &self.holder) {
            (None, Some(holder)) if holder.activated => {
                if let Some((_, last)) = self.peers.get(&holder.identity).and_then(|p| p.heartbeat) {
                    d.push((last + self.policy.crash_suspect_after, Due::Suspect));
                }
            }
            (Some(h), _) => {
                if let Some(r) = &h.recovery {
                    if !r.confirmed {
                        d.push((r.confirm_at, Due::Confirm));
                        d.extend(r.check_job_at.map(|at| (at, Due::CheckJob)));
                    }
                    d.push((r.give_up_at, Due::RecoveryLimit));
                }
                let target = h.target.identity.as_ref().filter(|_| h.target.away_until.is_none());
                if let Some((_, last)) = target.and_then(|t| self.peers.get(t)).and_then(|p| p.heartbeat) {
                    d.push((last + self.policy.crash_confirm_after, Due::TargetCrashed));
                }
            }
            _ => {}
        }
        if let Some(h) = &self.handoff {
            let timers = [
                (h.filler_deadline, Due::FillerLimit),
                (h.quiet_deadline, Due::SourceQuiet),
                (h.settle_until, Due::Settle),
                (h.grace_deadline, Due::SilenceGrace),
                // An absent source uploads nothing: its rejoin grace decides first.
                (h.bundle.deadline.filter(|_| h.source_away_until.is_none()), Due::Bundle),
                // Before `Ready`: at the same instant a stalled delivery is the precise reason.
                (
                    h.bundle.delivery_stall.filter(|_| h.bundle.delivering && h.target.away_until.is_none()),
                    Due::DeliveryStall,
                ),
                (h.target.ready_deadline, Due::Ready),
                (h.source_away_until, Due::SourceAway),
                (h.target.away_until, Due::TargetAway),
            ];
            for (at, due) in timers {
                if let Some(at) = at {
                    d.push((at, due));
                }
            }
        }
        if let Some((_, at)) = self.finishing.as_ref().and_then(|f| f.awaiting.as_ref()) {
            d.push((*at, Due::Audible));
        }
        if let Some((_, at)) = &self.filler.hold {
            d.push((*at, Due::FillerHold));
        }
        for (who, at) in &self.releases {
            d.push((*at, Due::Release(who.clone())));
        }
        for (name, at) in &self.hints {
            d.push((*at, Due::HintExpired(name.clone())));
        }
        for identity in self.standbys.keys().filter(|i| self.is_idle(i)) {
            if let Some((_, last)) = self.peers.get(identity).and_then(|p| p.heartbeat) {
                d.push((last + self.policy.crash_confirm_after, Due::StandbyCrashed(identity.clone())));
            }
        }
        d
    }

    fn fire(&mut self, due: Due, now: Instant) {
        match due {
            Due::Dispatch => {
                for g in self.dispatcher.on_timeout(now, &mut self.out) {
                    self.on_gave_up(g, now);
                }
            }
            Due::FillerLimit => {
                let Some(h) = &mut self.handoff else { return };
                h.filler_deadline = None;
                if h.recovery.is_some() {
                    // A recovery's filler deadline is one replacement's `recovery_timeout`:
                    // the next one is tried.
                    self.fail_target(FailReason::TargetNotReady, now);
                } else {
                    self.fall_back(FailReason::FillerLimit, now);
                }
            }
            Due::SourceQuiet => self.source_quiet("forced", Duration::ZERO, now),
            Due::Settle => {
                if let Some(h) = &mut self.handoff {
                    h.settle_until = None;
                }
            }
            Due::SilenceGrace => self.source_quiet("silence", Duration::ZERO, now),
            Due::Bundle => self.on_bundle_timeout(now),
            Due::DeliveryStall => {
                if let Some(h) = &mut self.handoff {
                    h.bundle.delivery_stall = None;
                }
                self.fail_target(FailReason::DeliveryFailed, now);
            }
            Due::Ready => {
                if let Some(h) = &mut self.handoff {
                    h.target.ready_deadline = None;
                }
                self.fail_target(FailReason::TargetNotReady, now);
            }
            Due::SourceAway => self.source_gone(now),
            Due::TargetAway => self.target_gone(now),
            Due::Audible => self.stop_waiting("not_heard", now),
            Due::FillerHold => {
                self.stop_filler(self.policy.filler_fade, "hold_limit", now);
                self.close_finished(now);
            }
            Due::Release(who) => {
                self.releases.remove(&who);
                if self.peers.contains_key(&who) {
                    self.out.push_back(Command::RemoveParticipant { identity: who });
                }
            }
            Due::Suspect => self.suspect_holder("heartbeat", now),
            Due::Confirm => self.confirm_crash("silence", now),
            Due::TargetCrashed => self.target_crashed("heartbeat", now),
            Due::RecoveryLimit => self.abandon(FailReason::FillerLimit, now),
            Due::HintExpired(name) => {
                self.hints.remove(&name);
            }
            Due::StandbyCrashed(identity) => self.standby_crashed(&identity),
            Due::CheckJob => {
                let Some(h) = &mut self.handoff else { return };
                let Some(r) = &mut h.recovery else { return };
                r.check_job_at = Some(now + JOB_CHECK_EVERY);
                let identity = h.source.clone();
                self.out.push_back(Command::CheckJob { identity });
            }
        }
    }

    /// After every input: move the handoff on if it can, and enforce the one-voice rule.
    fn settle(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        self.activate_holder_if_reachable(now);
        self.progress(now);
        self.keep_standbys(now);
        self.enforce_mutes();
        if self.handoff.is_none() && !self.filler.on {
            // While a hint is open a handoff is likely: baton's track streams encoded silence,
            // so the caller's receiver already plays it and the filler, when the source goes
            // quiet, is heard one path delay later instead of after a restarted stream.
            if self.hints.is_empty() {
                self.disarm_filler();
            } else {
                self.arm_filler();
            }
        }
    }

    // ---- participants ------------------------------------------------------------------------

    fn on_room_joined(&mut self, participants: Vec<Participant>, token: Vec<String>, now: Instant) {
        for p in participants {
            self.on_participant(p, now);
        }
        if self.room_joined {
            return;
        }
        self.room_joined = true;
        let Some(start) = self.policy.starting_agent.clone() else {
            return;
        };
        if self.holder.is_some() || self.find_agent(&start, &[]).is_some() {
            return;
        }
        if token.contains(&start) {
            self.dispatcher.expect_token(&start, Purpose::Start, self.policy.start_dispatch, now);
        } else {
            let meta = serde_json::json!({"baton": {"purpose": "start"}}).to_string();
            self.dispatcher.request(
                &start,
                Purpose::Start,
                self.policy.start_dispatch,
                meta,
                now,
                &mut self.out,
            );
        }
    }

    fn is_managed(&self, p: &Participant) -> bool {
        p.kind == ParticipantKind::Agent
            && p.agent_name.as_ref().is_some_and(|n| self.policy.agents.contains(n))
    }

    /// A present configured agent with this name, none of `except`.
    fn find_agent(&self, name: &str, except: &[String]) -> Option<String> {
        let mut candidates = self.peers.values().filter(|p| {
            self.is_managed(&p.info)
                && p.info.agent_name.as_deref() == Some(name)
                && !except.contains(&p.info.identity)
                && !self.crashed.contains(&p.info.identity)
                && !self.releases.contains_key(&p.info.identity)
        });
        // Prefer one whose adapter already said hello: it can be prepared right away.
        let all: Vec<&Peer> = candidates.by_ref().collect();
        all.iter().find(|p| p.reachable).or(all.first()).map(|p| p.info.identity.clone())
    }

    fn on_participant(&mut self, p: Participant, now: Instant) {
        let identity = p.identity.clone();
        let is_new = !self.peers.contains_key(&identity);
        if p.kind.is_caller() {
            self.callers_seen = true;
        }
        match self.peers.get_mut(&identity) {
            Some(peer) => peer.info = p.clone(),
            None => {
                self.peers.insert(
                    identity.clone(),
                    Peer { info: p.clone(), reachable: false, speaking: false, heartbeat: None },
                );
            }
        }
        if !self.is_managed(&p) {
            return;
        }
        // The source turning its own track off (or unpublishing it) is the clearest sign it has
        // obeyed `deactivate`.
        if let Some(h) = &self.handoff
            && h.source == identity
            && !h.quiet
            && !p.audio_live()
        {
            let detail = if p.audio.is_some() { "muted" } else { "no_audio" };
            self.source_quiet(detail, Duration::ZERO, now);
        }
        if !is_new || self.rejoined(&p, now) {
            return;
        }
        let purpose = self.dispatcher.joined(&p);
        let name = p.agent_name.clone().unwrap_or_default();
        if matches!(purpose, Some(Purpose::Standby(_))) {
            self.standbys.insert(identity.clone(), name.clone());
        }
        if let Some(h) = &self.handoff {
            // A confirmed recovery takes any agent of the name it needs, whoever dispatched it
            // (LiveKit Cloud restarting the failed job, a spare worker's job).
            let recovering = h.recovery.as_ref().is_some_and(|r| r.confirmed);
            let for_this = recovering
                || match &purpose {
                    Some(Purpose::Handoff(id)) => id == &h.id,
                    Some(Purpose::Start) => false,
                    Some(Purpose::Standby(_)) | None => !h.target.dispatching,
                };
            if for_this
                && h.target.identity.is_none()
                && h.target.name == name
                && h.source != identity
                && !self.crashed.contains(&identity)
            {
                let from_dispatch = matches!(purpose, Some(Purpose::Handoff(_)));
                if let Some(h) = self.handoff.as_mut().filter(|_| from_dispatch) {
                    h.target.dispatch_id = p.dispatch_id.clone();
                }
                let standby = matches!(purpose, Some(Purpose::Standby(_)));
                self.attach_target(identity, standby, now);
                return;
            }
        }
        if self.holder.is_none()
            && self.handoff.is_none()
            && self.vacated_by.as_deref() == Some(name.as_str())
        {
            // Every replacement of a crashed holder failed and nobody took the call since: this
            // agent of its name gets it, with the last checkpoint.
            self.vacated_by = None;
            return self.recover_into(&name, now);
        }
        let wants_start =
            purpose == Some(Purpose::Start) || self.policy.starting_agent.as_deref() == Some(name.as_str());
        if wants_start && self.holder.is_none() && self.handoff.is_none() {
            self.dispatcher.cancel(&Purpose::Start, &mut self.out);
            self.holder = Some(Holder::at_start(identity));
        }
    }

    fn on_left(&mut self, identity: &str, now: Instant) {
        let Some(peer) = self.peers.remove(identity) else {
            return;
        };
        self.releases.remove(identity);
        self.standbys.remove(identity);
        if peer.info.kind.is_caller() {
            let callers_left = self.peers.values().any(|p| p.info.kind.is_caller());
            if self.callers_seen && !callers_left {
                self.end_session(now);
            }
            return;
        }
        if self.filler.hold.as_ref().is_some_and(|(who, _)| who == identity) {
            self.stop_filler(self.policy.filler_fade, "holder_left", now);
        }
        if let Some(f) = &mut self.finishing
            && f.awaiting.as_ref().is_some_and(|(who, _)| who == identity)
        {
            f.awaiting = None;
        }
        self.close_finished(now);
        if self.holder.as_ref().is_some_and(|h| h.identity == identity) {
            // It left without being released: for the caller that is a crash, whatever the
            // reason. A recovery replaces it.
            let name = peer.info.agent_name.clone().unwrap_or_default();
            let last = peer.heartbeat.map_or(now, |(_, last)| last);
            let holder = self.holder.take();
            self.suspect(identity.to_owned(), holder, name, "left", last, now);
            self.confirm_crash("left", now);
            return;
        }
        let Some(h) = &mut self.handoff else {
            return;
        };
        if h.source == identity && h.recovery.is_some() {
            // The crashed holder's participant is gone: removed by baton, or its leave
            // confirms the crash.
            return self.confirm_crash("left", now);
        }
        let grace = self.policy.rejoin_grace;
        if h.source == identity {
            h.source_present = false;
            let ev = h.timeline.mark(Phase::SourceLeft, now, None);
            self.out.push_back(Command::Timeline(ev));
            if grace.is_zero() {
                self.source_gone(now);
            } else {
                // Its upload may resume when it is back.
                h.source_away_until = Some(now + grace);
            }
            self.source_quiet("left", Duration::ZERO, now);
        } else if h.target.identity.as_deref() == Some(identity) {
            if !grace.is_zero() {
                // Keep the identity, the delivery and the prepared state: a rejoin resumes them.
                h.target.away_until = Some(now + grace);
                let ev = h.timeline.mark(Phase::TargetLeft, now, None);
                self.out.push_back(Command::Timeline(ev));
                return;
            }
            self.target_gone(now);
        }
    }

    /// A participant that joined is a handoff's source or target back within `rejoin_grace`:
    /// it keeps its role, and its `hello` is answered with what it needs (the source
    /// `deactivate`, the target `prepare` again). A target from the same dispatch under another
    /// identity (a restarted job) gets the bundle again.
    fn rejoined(&mut self, p: &Participant, now: Instant) -> bool {
        let Some(h) = &mut self.handoff else { return false };
        if h.source_away_until.is_some() && h.source == p.identity {
            h.source_away_until = None;
            h.source_present = true;
            // Its upload resumes now: give it `stall_timeout` to show progress again.
            let b = &mut h.bundle;
            if let (Some(d), Some(cap)) = (b.deadline, b.upload_cap) {
                b.deadline = Some(d.max(now + self.policy.stall_timeout).min(cap));
            }
            self.mark(Phase::Rejoined, now, Some("source".to_owned()));
            return true;
        }
        let t = &h.target;
        let same = t.identity.as_deref() == Some(p.identity.as_str());
        let same_dispatch = p.agent_name.as_deref() == Some(t.name.as_str())
            && p.dispatch_id.is_some()
            && p.dispatch_id == t.dispatch_id;
        if t.away_until.is_none() || !(same || same_dispatch) {
            return false;
        }
        let old = t.identity.clone();
        if !same {
            // Another process: whatever reached the old identity is lost with it.
            if h.bundle.delivering
                && let (Some(transfer_id), Some(to)) = (h.bundle.transfer, old)
            {
                self.out.push_back(Command::CancelTransfer { transfer_id, to });
            }
            h.bundle.delivering = false;
            h.bundle.delivered = false;
        }
        let t = &mut h.target;
        t.identity = Some(p.identity.clone());
        t.away_until = None;
        // A new connection: the adapter says hello again and is prepared again, and it is
        // ready only when it says so again.
        t.prepared = false;
        t.ready = false;
        t.activated = false;
        t.ready_deadline = Some(now + self.policy.ready_timeout);
        t.transfer_cap = Some(now + self.policy.max_transfer_time);
        if let Some(stall) = &mut h.bundle.delivery_stall {
            // The delivery resumes now: give it `stall_timeout` to show progress again.
            *stall = (*stall).max(now + self.policy.stall_timeout);
        }
        self.mark(Phase::Rejoined, now, Some("target".to_owned()));
        true
    }

    /// The source left and did not come back within `rejoin_grace`: a bundle it had not
    /// finished uploading will not come.
    fn source_gone(&mut self, now: Instant) {
        let Some(h) = &mut self.handoff else { return };
        h.source_away_until = None;
        if h.bundle.expected && !h.bundle.held && !h.bundle.lost {
            self.bundle_lost(now);
        }
    }

    /// The target left and did not come back within `rejoin_grace`, or crashed: cancel what
    /// baton was delivering to it, and give the same bundle to another agent of its name (at
    /// most `recovery_attempts` times per handoff), then the next alternate. A target that
    /// leaves before it is ready has crashed for the caller, whatever the reason (its worker
    /// removes a dead job's participant, `lk_baton.remove_crashed_jobs`).
    fn target_gone(&mut self, now: Instant) {
        let Some(h) = &mut self.handoff else { return };
        h.target.away_until = None;
        let activated = std::mem::take(&mut h.target.activated);
        let Some(identity) = h.target.identity.take() else { return };
        let id = h.id.clone();
        if activated && self.peers.contains_key(&identity) {
            // Its job ended but its participant is still there: whatever is left of it must
            // not keep the floor it was given before the settle's end.
            let deactivate =
                BatonMessage::Deactivate { handoff: Some(id), reason: DeactivateReason::Standby };
            self.send(&identity, None, deactivate);
        }
        let Some(h) = &mut self.handoff else { return };
        if h.replacements_left > 0 {
            h.replacements_left -= 1;
            h.alternates.push_front(h.target.name.clone());
        }
        if h.bundle.delivering
            && !h.bundle.delivered
            && let Some(t) = h.bundle.transfer
        {
            self.out.push_back(Command::CancelTransfer { transfer_id: t, to: identity });
        }
        h.bundle.delivering = false;
        h.bundle.delivered = false;
        self.fail_target(FailReason::TargetLeft, now);
    }

    fn on_speaking(&mut self, identity: &str, speaking: bool, now: Instant) {
        if let Some(p) = self.peers.get_mut(identity) {
            p.speaking = speaking;
        }
        if let Some(h) = &mut self.handoff
            && h.source == identity
            && !h.quiet
        {
            h.sentence_pending &= !speaking;
            h.grace_deadline = (!speaking && !h.sentence_pending).then(|| now + self.policy.silence_grace);
        }
        if speaking {
            self.heard(identity, now);
        }
    }

    // ---- control messages --------------------------------------------------------------------

    fn authorize(&self, from: &str) -> Result<(), SecurityReason> {
        let Some(peer) = self.peers.get(from) else {
            return Err(SecurityReason::UnknownParticipant);
        };
        if peer.info.kind != ParticipantKind::Agent {
            return Err(SecurityReason::NotAnAgent);
        }
        let Some(name) = &peer.info.agent_name else {
            return Err(SecurityReason::UnnamedAgent);
        };
        if !self.policy.agents.contains(name) {
            return Err(SecurityReason::AgentNotConfigured { agent_name: name.clone() });
        }
        Ok(())
    }

    fn security(&mut self, from: String, message_type: &'static str, reason: SecurityReason) {
        let kind = self.peers.get(&from).map(|p| p.info.kind);
        self.out.push_back(Command::Security(SecurityEvent { from, kind, message_type, reason }));
    }

    fn ignored(&mut self, from: &str, message_type: &'static str, why: &'static str) {
        self.out.push_back(Command::Alert(Alert::IgnoredMessage {
            from: from.to_owned(),
            message_type,
            why,
        }));
    }

    fn send(&mut self, to: &str, re: Option<String>, message: BatonMessage) {
        self.out.push_back(Command::Send { to: to.to_owned(), re, message });
    }

    fn on_control(&mut self, from: String, id: String, message: AgentMessage, now: Instant) {
        let ty = message.type_name();
        if let Err(reason) = self.authorize(&from) {
            self.security(from, ty, reason);
            return;
        }
        if let AgentMessage::Hello { agent_name, .. } = &message {
            let actual = self.peers[&from].info.agent_name.clone().unwrap_or_default();
            if *agent_name != actual {
                self.security(from, ty, SecurityReason::NameMismatch { claimed: agent_name.clone(), actual });
                return;
            }
        }
        if self.crashed.contains(&from) {
            // Declared crashed and replaced: whatever it says now is stale (a frozen process
            // that woke up), and must not undo the recovery.
            return self.ignored(&from, ty, "declared crashed and replaced");
        }
        let suspected = self
            .handoff
            .as_ref()
            .is_some_and(|h| h.source == from && h.recovery.as_ref().is_some_and(|r| !r.confirmed));
        if suspected && matches!(message, AgentMessage::Heartbeat { .. } | AgentMessage::Hello { .. }) {
            self.clear_suspect(now);
        }
        if let AgentMessage::Heartbeat { .. } = message {
            // Liveness only: it neither makes the adapter reachable (that takes a hello) nor
            // gets an answer. One from an adapter that announced none is ignored.
            if let Some((_, last)) = self.peers.get_mut(&from).and_then(|p| p.heartbeat.as_mut()) {
                *last = now;
            }
            return;
        }
        let was_reachable = self.peers[&from].reachable;
        if let Some(p) = self.peers.get_mut(&from) {
            p.reachable = true;
            if let AgentMessage::Hello { heartbeat_ms: Some(ms), .. } = &message {
                let every = Duration::from_millis(u64::from((*ms).clamp(MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS)));
                p.heartbeat = Some((every, now));
            }
        }
        match message {
            AgentMessage::Heartbeat { .. } => {}
            AgentMessage::Hello { .. } => self.on_hello(&from, was_reachable),
            AgentMessage::Handoff {
                target,
                reason,
                transfer,
                bundle_follows,
                quiet,
                quiet_ms,
                filler,
                speaking,
            } => {
                let quiet = quiet.then(|| Duration::from_millis(quiet_ms.unwrap_or(0).into()));
                // `quiet` wins: a source that says both has nothing left to say.
                let speaking = speaking && quiet.is_none();
                let request = Request { target, reason, transfer, bundle_follows, quiet, filler, speaking };
                self.on_handoff_request(from, id, request, now)
            }
            AgentMessage::Hint { target } => self.on_hint(&from, target, now),
            AgentMessage::Ready { handoff } => {
                let Some(h) = &mut self.handoff else {
                    return self.ignored(&from, ty, "no handoff under way");
                };
                if h.target.identity.as_deref() != Some(from.as_str()) || h.id != handoff {
                    return self.ignored(&from, ty, "not the target of this handoff");
                }
                if !h.target.ready {
                    h.target.ready = true;
                    h.target.ready_deadline = None;
                    let ev = h.timeline.mark(Phase::TargetReady, now, None);
                    self.out.push_back(Command::Timeline(ev));
                }
            }
            AgentMessage::Quiet { quiet_ms, .. } => {
                if self.handoff.as_ref().is_some_and(|h| h.source == from && !h.quiet) {
                    let since = Duration::from_millis(quiet_ms.unwrap_or(0).into());
                    self.source_quiet("quiet", since, now);
                } else {
                    self.ignored(&from, ty, "not a source finishing its turn");
                }
            }
            AgentMessage::ToolResult { handoff, call_id, name, status, is_error, output, truncated } => {
                let result = ToolResult { handoff, call_id, name, status, is_error, output, truncated };
                self.on_tool_result(&from, result);
            }
            AgentMessage::Tail { handoff, items, user_state } => {
                self.on_tail(&from, handoff, items, user_state)
            }
        }
    }

    /// The agent name of `from` if it is the source of accepted handoff `handoff` and has not
    /// got the floor back since, else why what it sends for that handoff's target (a
    /// `tool_result`, a `tail`) is not forwarded.
    fn source_of(&self, from: &str, handoff: &str) -> Result<String, &'static str> {
        if !self.accepted_requests.iter().any(|a| a.from == from && a.handoff == handoff) {
            return Err("not the source of that handoff");
        }
        if self.holder.as_ref().is_some_and(|h| h.identity == from) {
            return Err("the source holds the floor again");
        }
        Ok(self.peers.get(from).and_then(|p| p.info.agent_name.clone()).unwrap_or_default())
    }

    /// A source's `tail`: what its context gained after the bundle was built. Kept with the
    /// handoff under way and sent to its target once prepared (to every target it tries, in
    /// order), or to the floor holder when the handoff has completed; dropped (and logged) when
    /// the sender is not that handoff's source, holds the floor again itself (a handback: the
    /// tail is its own context), nobody holds the floor, or the forwarded message would not
    /// fit one packet (the sender's limit is 14 000 bytes, docs/protocol.md).
    fn on_tail(
        &mut self,
        from: &str,
        handoff: String,
        items: Vec<serde_json::Value>,
        user_state: Option<serde_json::Value>,
    ) {
        const TY: &str = "tail";
        let source = match self.source_of(from, &handoff) {
            Ok(source) => source,
            Err(why) => return self.ignored(from, TY, why),
        };
        let message = BatonMessage::Tail { handoff: handoff.clone(), source, items, user_state };
        if message.envelope_len(None) > MAX_CONTROL_MESSAGE {
            return self.ignored(from, TY, "too large to forward");
        }
        if let Some(h) = self.handoff.as_mut().filter(|h| h.id == handoff) {
            if h.tails.len() == MAX_TAILS_PER_HANDOFF {
                return self.ignored(from, TY, "too many tail messages for one handoff");
            }
            h.tails.push(message.clone());
            if let (Some(target), true) = (&h.target.identity, h.target.prepared) {
                let target = target.clone();
                self.send(&target, None, message);
            }
        } else if let Some(holder) = self.holder.as_ref().map(|h| h.identity.clone()) {
            self.send(&holder, None, message);
        } else {
            self.ignored(from, TY, "nobody holds the floor");
        }
    }

    /// A source's late tool result: forwarded once, to the target of its handoff while that is
    /// under way (held until the target was sent `prepare`), else to the agent holding the
    /// floor; dropped (and logged) when the sender is not that handoff's source, holds the
    /// floor again itself, or nobody else holds it.
    fn on_tool_result(&mut self, from: &str, r: ToolResult) {
        const TY: &str = "tool_result";
        let source = match self.source_of(from, &r.handoff) {
            Ok(source) => source,
            Err(why) => return self.ignored(from, TY, why),
        };
        let key = (r.handoff.clone(), r.call_id.clone());
        if self.forwarded_results.contains(&key) {
            return self.ignored(from, TY, "already forwarded");
        }
        let message = BatonMessage::ToolResult {
            handoff: r.handoff.clone(),
            source,
            call_id: r.call_id,
            name: r.name,
            status: r.status,
            is_error: r.is_error,
            output: r.output,
            truncated: r.truncated,
        };
        let Some(message) = fit_tool_result(message) else {
            return self.ignored(from, TY, "too large to forward even without its output");
        };
        if let Some(h) = self.handoff.as_mut().filter(|h| h.id == r.handoff) {
            match (&h.target.identity, h.target.prepared) {
                (Some(target), true) => {
                    let target = target.clone();
                    self.send(&target, None, message);
                }
                _ => h.tool_results.push(message),
            }
        } else if let Some(holder) = self.holder.as_ref().map(|h| h.identity.clone()) {
            self.send(&holder, None, message);
        } else {
            return self.ignored(from, TY, "nobody holds the floor");
        }
        if self.forwarded_results.len() == FORWARDED_RESULTS_KEPT {
            self.forwarded_results.pop_front();
        }
        self.forwarded_results.push_back(key);
    }

    fn on_hello(&mut self, from: &str, was_reachable: bool) {
        if let Some(h) = self.holder.as_mut().filter(|h| h.identity == from) {
            // A repeated hello means the adapter restarted and lost its state: tell it again.
            if h.activated && was_reachable {
                h.activated = false;
            }
            return;
        }
        if let Some(h) = &self.handoff {
            // The source and the target of the handoff under way keep their parts: a hello from
            // one of them (a restarted adapter, or a rejoin within `rejoin_grace`) is answered
            // with what it needs to go on. A target not prepared yet gets `prepare` from
            // `progress` now that it is reachable.
            if h.source == from {
                let message = BatonMessage::Deactivate {
                    handoff: Some(h.id.clone()),
                    reason: DeactivateReason::Handoff,
                };
                return self.send(from, None, message);
            }
            if h.target.identity.as_deref() == Some(from) {
                if h.target.prepared {
                    let message = Self::prepare_message(h, self.policy.recovery_greeting);
                    self.send(from, None, message);
                }
                return;
            }
        }
        self.send(from, None, BatonMessage::Deactivate { handoff: None, reason: DeactivateReason::Standby });
    }

    fn activate_holder_if_reachable(&mut self, now: Instant) {
        let Some(h) = &self.holder else { return };
        if h.activated || !self.peers.get(&h.identity).is_some_and(|p| p.reachable) {
            return;
        }
        let (identity, activation) = (h.identity.clone(), h.activation.clone());
        self.send(&identity, None, activation);
        self.unmute(&identity);
        self.watch_from(&identity, now);
        if let Some(h) = &mut self.holder {
            h.activated = true;
        }
    }

    fn on_handoff_request(&mut self, from: String, msg_id: String, request: Request, now: Instant) {
        let Request { target, reason, transfer, bundle_follows, quiet, filler, speaking: sentence } = request;
        if let Some(a) = self.accepted_requests.iter().find(|a| a.from == from && a.msg_id == msg_id) {
            // The same request again (the adapter resent it after a reconnect and never saw the
            // answer): answer it the same way, and change nothing.
            let message =
                BatonMessage::HandoffAccepted { handoff: a.handoff.clone(), target: a.target.clone() };
            self.send(&from, Some(msg_id), message);
            return;
        }
        // The holder of record whose request overtook its hello (a baton restored from the
        // store, or a hello dropped at join) is reachable now: it gets the floor back first,
        // as `settle` would give it after this message, and its request is then its own.
        self.activate_holder_if_reachable(now);
        let source_name = self.peers[&from].info.agent_name.clone().unwrap_or_default();
        let refusal = if self.handoff.is_some() {
            Some(RefuseReason::HandoffInProgress)
        } else if !self.holder.as_ref().is_some_and(|h| h.identity == from && h.activated) {
            Some(RefuseReason::NotFloorHolder)
        } else if !self.policy.agents.contains(&target) {
            Some(RefuseReason::UnknownTarget)
        } else if target == source_name {
            Some(RefuseReason::SameAgent)
        } else {
            Self::prepare_unsendable(&source_name, &reason, transfer, bundle_follows)
        };
        if let Some(reason) = refusal {
            self.send(&from, Some(msg_id), BatonMessage::HandoffRefused { reason });
            return;
        }
        if filler && self.filler.source.as_ref().is_some_and(|(who, _)| *who == from) {
            // The same source's earlier filler becomes this handoff's: it plays on, and a stop
            // for the earlier handoff would only end it.
            self.filler.source = None;
        }
        self.stop_waiting("next_handoff", now);
        // The hint came true: the instance it brought in is the target now (or failed), and is
        // not kept beyond what `standby` asks for.
        self.hints.remove(&target);
        let id = format!("h-{}", self.next_handoff);
        self.next_handoff += 1;
        let mut timeline = Timeline::new(&id, &source_name, &target, &reason, now);
        let ev = timeline.mark(Phase::Requested, now, None);
        self.out.push_back(Command::Timeline(ev));
        self.arm_filler();
        if self.accepted_requests.len() == ACCEPTED_REQUESTS_KEPT {
            self.accepted_requests.pop_front();
        }
        self.accepted_requests.push_back(AcceptedRequest {
            from: from.clone(),
            msg_id: msg_id.clone(),
            handoff: id.clone(),
            target: target.clone(),
        });
        self.send(
            &from,
            Some(msg_id),
            BatonMessage::HandoffAccepted { handoff: id.clone(), target: target.clone() },
        );
        self.send(
            &from,
            None,
            BatonMessage::Deactivate { handoff: Some(id.clone()), reason: DeactivateReason::Handoff },
        );
        self.holder = None;
        if filler {
            // A filler still held from an earlier handoff belongs to that one's source.
            self.stop_source_filler(self.policy.filler_fade);
            self.filler.source = Some((from.clone(), id.clone()));
        }

        let mut bundle = Bundle::default();
        if transfer.is_some() || bundle_follows {
            bundle.expected = true;
            bundle.transfer = transfer;
            let already =
                transfer.and_then(|t| self.held_bundles.iter().position(|h| h.0 == t && h.1 == from));
            if let Some(i) = already {
                self.held_bundles.remove(i);
                bundle.held = true;
                let ev = timeline.mark(Phase::BundleReceived, now, None);
                self.out.push_back(Command::Timeline(ev));
            } else {
                bundle.deadline = Some(now + self.policy.bundle_timeout);
                bundle.upload_cap = Some(now + self.policy.max_transfer_time);
            }
        }
        let alternates = self
            .policy
            .alternates
            .get(&target)
            .map(|alts| {
                let mut seen = vec![target.clone(), source_name.clone()];
                alts.iter()
                    .filter(|a| {
                        let fresh = !seen.contains(a);
                        seen.push((*a).clone());
                        fresh
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let source_peer = &self.peers[&from];
        let audible = source_peer.info.audio_live();
        let speaking = source_peer.speaking;
        self.handoff = Some(Handoff {
            id,
            source: from,
            source_name,
            source_present: true,
            source_away_until: None,
            reason,
            alternates,
            target: Target::new(target),
            quiet: false,
            quiet_deadline: Some(
                now + if sentence { self.policy.sentence_timeout } else { self.policy.source_quiet_timeout },
            ),
            settle_until: None,
            grace_deadline: (!speaking && !sentence).then(|| now + self.policy.silence_grace),
            filler_deadline: None,
            bundle,
            timeline,
            tool_results: Vec::new(),
            tails: Vec::new(),
            sentence_pending: sentence && !speaking,
            failed_targets: Vec::new(),
            replacements_left: self.policy.recovery_attempts,
            recovery: None,
        });
        if !audible {
            // Nothing of the source reaches the caller: the gap starts now, so must the filler.
            self.source_quiet("no_audio", Duration::ZERO, now);
        } else if let Some(since) = quiet {
            // The source finished its sentence before asking: no need to wait for `quiet`.
            self.source_quiet("quiet", since, now);
        }
        self.acquire_target(now);
    }

    // ---- standbys and hints -------------------------------------------------------------------

    /// The floor holder's `hint`: keep an instance of `target` in the room for `hint_timeout`.
    /// Refused (logged, never answered) unless the sender holds the floor with no handoff under
    /// way, `target` is another configured agent, and its previous hint is `hint_interval` old.
    fn on_hint(&mut self, from: &str, target: String, now: Instant) {
        let own = self.peers.get(from).and_then(|p| p.info.agent_name.as_deref());
        let why = if self.handoff.is_some() {
            Some("a handoff is under way")
        } else if !self.holder.as_ref().is_some_and(|h| h.identity == from && h.activated) {
            Some("not the floor holder")
        } else if !self.policy.agents.contains(&target) {
            Some("target is not a configured agent")
        } else if own == Some(target.as_str()) {
            Some("target is the sender's own agent name")
        } else if self.last_hint.get(from).is_some_and(|at| now < *at + self.policy.hint_interval) {
            Some("rate limited: hint_interval since the previous hint")
        } else {
            None
        };
        if let Some(why) = why {
            return self.ignored(from, "hint", why);
        }
        self.last_hint.insert(from.to_owned(), now);
        self.hints.insert(target, now + self.policy.hint_timeout);
    }

    /// Whether `identity` is a configured agent in the room with no part in the call: not
    /// holding the floor, not a handoff's source or target, not released, not crashed. Only
    /// such agents are standbys.
    fn is_idle(&self, identity: &str) -> bool {
        let Some(p) = self.peers.get(identity) else { return false };
        let busy = self.holder.as_ref().is_some_and(|h| h.identity == identity)
            || self
                .handoff
                .as_ref()
                .is_some_and(|h| h.source == identity || h.target.identity.as_deref() == Some(identity));
        self.is_managed(&p.info)
            && !busy
            && !self.releases.contains_key(identity)
            && !self.crashed.contains(identity)
    }

    /// How many idle instances of `name` the call wants now: its `standby` count (from the
    /// start, or while a hint for it is open), at least one while a hint is open, none while an
    /// agent of that name holds the floor.
    fn standbys_wanted(&self, name: &str) -> usize {
        let holder = self.holder.as_ref().and_then(|h| self.peers.get(&h.identity));
        if holder.is_some_and(|p| p.info.agent_name.as_deref() == Some(name)) {
            return 0;
        }
        let spec = self.policy.standby.get(name);
        let from_start = spec.filter(|s| s.from == StandbyFrom::Start).map_or(0, |s| s.count);
        let hinted = if self.hints.contains_key(name) { spec.map_or(1, |s| s.count.max(1)) } else { 0 };
        from_start.max(hinted) as usize
    }

    /// Brings the idle instances of every agent with standbys (or an open hint) to what the
    /// call wants: dispatches the missing ones (not while a handoff is under way: the switch
    /// must not share the host with a cold start), removes the ones baton dispatched that are
    /// no longer wanted (a hint that ran out), those it did not dispatch are left alone.
    fn keep_standbys(&mut self, now: Instant) {
        if !self.room_joined || self.ended {
            return;
        }
        // Also the names of standbys whose hint ran out: they may have to go.
        let names: BTreeSet<String> = self
            .policy
            .standby
            .keys()
            .chain(self.hints.keys())
            .chain(self.standbys.values())
            .cloned()
            .collect();
        for name in names {
            let want = self.standbys_wanted(&name);
            let mut idle: Vec<(bool, String)> = self
                .peers
                .values()
                .filter(|p| {
                    p.info.agent_name.as_deref() == Some(name.as_str()) && self.is_idle(&p.info.identity)
                })
                .map(|p| (p.reachable, p.info.identity.clone()))
                .collect();
            let have = idle.len() + self.dispatcher.standbys_in_flight(&name);
            if self.handoff.is_none() {
                for _ in have..want {
                    self.dispatch_standby(&name, now);
                }
            }
            if idle.len() > want {
                // Those that cannot be prepared yet go first.
                idle.sort();
                let surplus = idle.len() - want;
                let removable: Vec<String> = idle
                    .into_iter()
                    .map(|(_, identity)| identity)
                    .filter(|identity| self.standbys.contains_key(identity))
                    .take(surplus)
                    .collect();
                for identity in removable {
                    self.remove_standby(identity, now);
                }
            }
        }
    }

    /// Dispatches one standby of `name`, unless its dispatches in this call are used up.
    fn dispatch_standby(&mut self, name: &str, now: Instant) {
        let slots = self.policy.standby.get(name).map_or(1, |s| s.count.max(1));
        let used = self.standby_dispatches.entry(name.to_owned()).or_default();
        if *used >= slots * STANDBY_DISPATCHES_PER_SLOT {
            return;
        }
        *used += 1;
        let purpose = Purpose::Standby(self.next_standby);
        self.next_standby += 1;
        let meta = serde_json::json!({"baton": {"purpose": "standby"}}).to_string();
        self.dispatcher.request(name, purpose, self.policy.handoff_dispatch, meta, now, &mut self.out);
    }

    /// Removes a standby baton dispatched; until it has left it counts as released (no role,
    /// not chosen as a target), and it is removed again after `release_grace` if it lingers.
    fn remove_standby(&mut self, identity: String, now: Instant) {
        self.standbys.remove(&identity);
        self.releases.insert(identity.clone(), now + self.policy.release_grace);
        self.out.push_back(Command::RemoveParticipant { identity });
    }

    /// An idle standby went silent for `crash_confirm_after`: it is crashed (never given a
    /// role) and removed; [`keep_standbys`](Self::keep_standbys) dispatches another.
    fn standby_crashed(&mut self, identity: &str) {
        self.standbys.remove(identity);
        self.crashed.insert(identity.to_owned());
        self.out.push_back(Command::RemoveParticipant { identity: identity.to_owned() });
    }

    // ---- recovery -----------------------------------------------------------------------------

    /// `identity` has just been given a role (the floor, or a handoff's target): its heartbeat
    /// gaps count from now at the earliest, so a standby that was quiet before is not found
    /// crashed the instant it is chosen (it gets the whole limit to show it is alive).
    fn watch_from(&mut self, identity: &str, now: Instant) {
        if let Some((_, last)) = self.peers.get_mut(identity).and_then(|p| p.heartbeat.as_mut()) {
            *last = (*last).max(now);
        }
    }

    /// The floor holder's heartbeat gap reached `crash_suspect_after`.
    fn suspect_holder(&mut self, signal: &str, now: Instant) {
        let Some(holder) = &self.holder else { return };
        let Some(peer) = self.peers.get(&holder.identity) else { return };
        let name = peer.info.agent_name.clone().unwrap_or_default();
        let last = peer.heartbeat.map_or(now, |(_, last)| last);
        let identity = holder.identity.clone();
        let holder = self.holder.take();
        self.suspect(identity.clone(), holder, name, signal, last, now);
        // The fastest certain signal, if the server has it: the agent's worker saw its job
        // process die and reported the job's end.
        self.out.push_back(Command::CheckJob { identity });
        if let Some(r) = self.handoff.as_mut().and_then(|h| h.recovery.as_mut()) {
            r.check_job_at = Some(now + JOB_CHECK_EVERY);
        }
    }

    /// The agent `identity` (agent name `name`, last heard of at `last`), holding the floor as
    /// `holder`, may have crashed: the caller hears the filler from now, the agent is muted,
    /// and a recovery starts, unconfirmed (it clears if the agent shows it is alive).
    fn suspect(
        &mut self,
        identity: String,
        holder: Option<Holder>,
        name: String,
        signal: &str,
        last: Instant,
        now: Instant,
    ) {
        // A finished handoff still waiting for its target to be heard stops waiting: the
        // recovery's timeline is the open one from now.
        self.stop_waiting("suspected", now);
        let id = format!("r-{}", self.next_recovery);
        self.next_recovery += 1;
        let mut timeline = Timeline::recovery(&id, &name, last);
        let ev = timeline.mark(Phase::Suspected, now, Some(signal.to_owned()));
        self.out.push_back(Command::Timeline(ev));
        let mut alternates: VecDeque<String> =
            std::iter::repeat_n(name.clone(), self.policy.recovery_attempts.saturating_sub(1) as usize)
                .collect();
        for alt in self.policy.alternates.get(&name).into_iter().flatten() {
            if *alt != name && !alternates.contains(alt) {
                alternates.push_back(alt.clone());
            }
        }
        let mut target = Target::new(name.clone());
        if self.policy.recovery_attempts == 0 {
            // No replacement of the same name: the first alternate is the first target.
            target = Target::new(alternates.pop_front().unwrap_or_default());
        }
        self.handoff = Some(Handoff {
            id,
            source: identity.clone(),
            source_name: name,
            source_present: true,
            source_away_until: None,
            reason: "crash suspected".to_owned(),
            alternates,
            target,
            // Nothing of a dead agent's is left to drain at the caller: its audio stopped when
            // it died, before the suspicion.
            quiet: true,
            quiet_deadline: None,
            settle_until: None,
            grace_deadline: None,
            filler_deadline: None,
            bundle: Bundle::default(),
            timeline,
            tool_results: Vec::new(),
            tails: Vec::new(),
            sentence_pending: false,
            failed_targets: Vec::new(),
            replacements_left: self.policy.recovery_attempts,
            recovery: Some(Recovery {
                holder,
                confirmed: false,
                confirm_at: (last + self.policy.crash_confirm_after).max(now),
                give_up_at: now + self.policy.max_filler,
                check_job_at: None,
            }),
        });
        // Filler first: it is local and instant, while the mute is a server round trip.
        self.arm_filler();
        if !self.filler.on {
            self.filler.on = true;
            self.out.push_back(Command::Filler(FillerCommand::On));
        }
        self.mark(Phase::FillerOn, now, None);
        self.mute(&identity);
    }

    /// The suspected holder is alive (a heartbeat or a hello came before the crash was
    /// confirmed): it keeps the floor, unmuted, and the filler fades.
    fn clear_suspect(&mut self, now: Instant) {
        self.mark(Phase::SuspectCleared, now, None);
        let Some(mut h) = self.handoff.take() else { return };
        let Some(holder) = h.recovery.take().and_then(|r| r.holder) else { return };
        let identity = holder.identity.clone();
        self.holder = Some(holder);
        self.unmute(&identity);
        h.timeline.outcome = Some(Outcome::Cleared);
        self.finishing = Some(Finishing { timeline: h.timeline, awaiting: None });
        self.stop_filler(self.policy.filler_fade, "cleared", now);
        self.close_finished(now);
    }

    /// The suspected holder crashed for certain (`signal`): it is declared crashed (baton
    /// refuses its messages and checkpoints and asks the server to remove it), its last
    /// checkpoint becomes the recovery bundle, and a replacement is acquired.
    fn confirm_crash(&mut self, signal: &str, now: Instant) {
        let Some(h) = &mut self.handoff else { return };
        let Some(r) = h.recovery.as_mut().filter(|r| !r.confirmed) else { return };
        r.confirmed = true;
        h.source_present = false;
        h.reason = format!("recovery after {signal}");
        h.timeline.reason = h.reason.clone();
        // baton builds the bundle itself (Event::RecoveryBundle): `prepare` announces one
        // whose id is not known yet.
        h.bundle.expected = true;
        let crashed = h.source.clone();
        let command = Command::AgentCrashed {
            identity: crashed.clone(),
            agent: h.source_name.clone(),
            recovery: h.id.clone(),
            reason: h.reason.clone(),
        };
        self.mark(Phase::Confirmed, now, Some(signal.to_owned()));
        if !crashed.is_empty() {
            self.crashed.insert(crashed.clone());
        }
        self.out.push_back(command);
        if self.peers.contains_key(&crashed) {
            // A killed agent's participant lingers for about 20 s (issue 13); removed, it
            // cannot hold a replacement on standby or come back to life mid-call.
            self.out.push_back(Command::RemoveParticipant { identity: crashed });
            self.mark(Phase::Removed, now, None);
        }
        if self.handoff.as_ref().is_some_and(|h| h.target.name.is_empty()) {
            // recovery_attempts = 0 and no alternates: nothing can take the call.
            return self.conclude_failure(FailReason::TargetNoShow, now);
        }
        self.acquire_target(now);
    }

    /// The handoff's (or recovery's) target stopped sending heartbeats for
    /// `crash_confirm_after`, or its job ended: it crashed while being prepared. It is declared
    /// crashed and removed, and another agent of the same name gets the same bundle (at most
    /// `recovery_attempts` times), else the next alternate.
    fn target_crashed(&mut self, signal: &str, now: Instant) {
        let Some(h) = &mut self.handoff else { return };
        let Some(identity) = h.target.identity.clone() else { return };
        // Still in the room (lingering, or frozen): never to be chosen again.
        self.crashed.insert(identity.clone());
        self.mark(Phase::TargetLeft, now, Some(format!("crashed: {signal}")));
        self.out.push_back(Command::RemoveParticipant { identity });
        self.target_gone(now);
    }

    /// baton's recovery bundle is built (or there is no checkpoint to build it from).
    fn on_recovery_bundle(&mut self, recovery: &str, bundle: Option<(TransferId, u64)>, now: Instant) {
        let Some(h) = self.handoff.as_mut().filter(|h| h.id == recovery && h.recovery.is_some()) else {
            return;
        };
        match bundle {
            Some((transfer_id, bytes)) => {
                h.bundle.transfer = Some(transfer_id);
                h.bundle.held = true;
                h.timeline.bundle_bytes = Some(bytes);
                self.mark(Phase::BundleReceived, now, Some("checkpoint".to_owned()));
            }
            // The replacement starts without the context (and is told so if prepared).
            None => self.bundle_lost(now),
        }
    }

    /// The server says `identity`'s agent job ended: a suspected holder or a handoff target
    /// crashed for certain.
    fn on_job_ended(&mut self, identity: &str, status: &str, now: Instant) {
        let Some(h) = &self.handoff else { return };
        let signal = format!("job_ended:{status}");
        if h.source == identity && h.recovery.is_some() {
            self.confirm_crash(&signal, now);
        } else if h.target.identity.as_deref() == Some(identity) {
            self.target_crashed(&signal, now);
        }
    }

    /// The floor is vacant after a failed recovery of agent `name` and `identity`, an agent of
    /// that name, has joined: a recovery (already confirmed) gives it the call with the last
    /// checkpoint.
    fn recover_into(&mut self, name: &str, now: Instant) {
        // Nobody is suspected now (the crashed holder is gone): the source is nobody, and the
        // recovery is confirmed at once; acquiring its target finds the agent that joined.
        self.suspect(String::new(), None, name.to_owned(), "vacant", now, now);
        self.confirm_crash("late_join", now);
    }

    // ---- the handoff -------------------------------------------------------------------------

    fn mark(&mut self, phase: Phase, now: Instant, detail: Option<String>) {
        if let Some(h) = &mut self.handoff {
            let ev = h.timeline.mark(phase, now, detail);
            self.out.push_back(Command::Timeline(ev));
        }
    }

    fn dispatch_metadata(h: &Handoff) -> String {
        let purpose = if h.recovery.is_some() { "recovery" } else { "handoff" };
        serde_json::json!({"baton": {
            "purpose": purpose,
            "handoff": h.id,
            "source": h.source_name,
        }})
        .to_string()
    }

    /// Finds the current target in the room (warm) or dispatches it (cold).
    fn acquire_target(&mut self, now: Instant) {
        let timeout = self.policy.recovery_timeout;
        let Some(h) = &mut self.handoff else { return };
        if h.recovery.is_some() {
            // Each replacement gets `recovery_timeout` to become ready.
            h.filler_deadline = Some(now + timeout);
        }
        let name = h.target.name.clone();
        // Not the source, nor a target that already failed in this handoff (a standby that was
        // not ready in time is not chosen again: a new one is dispatched).
        let except: Vec<String> =
            std::iter::once(h.source.clone()).chain(h.failed_targets.iter().cloned()).collect();
        let Some(h) = &self.handoff else { return };
        if let Some(identity) = self.find_agent(&name, &except) {
            self.attach_target(identity, true, now);
            return;
        }
        if self.dispatcher.standbys_in_flight(&name) > 0 {
            // A standby (a hint's, usually) is on its way and further along than a new
            // dispatch: it is the target when it joins, or a dispatch follows if it gives up.
            self.mark(Phase::TargetDispatched, now, Some(format!("{name}: standby on its way")));
            return;
        }
        let purpose = Purpose::Handoff(h.id.clone());
        let meta = Self::dispatch_metadata(h);
        self.dispatcher.request(&name, purpose, self.policy.handoff_dispatch, meta, now, &mut self.out);
        if let Some(h) = &mut self.handoff {
            h.target.dispatching = true;
        }
        self.mark(Phase::TargetDispatched, now, Some(name));
    }

    fn attach_target(&mut self, identity: String, warm: bool, now: Instant) {
        self.watch_from(&identity, now);
        let Some(h) = &mut self.handoff else { return };
        h.target.identity = Some(identity);
        h.target.dispatching = false;
        h.target.ready_deadline = Some(now + self.policy.ready_timeout);
        h.target.transfer_cap = Some(now + self.policy.max_transfer_time);
        if warm && h.timeline.phases.iter().all(|m| m.phase != Phase::AlternateTried) {
            h.timeline.warm = true;
        }
        let detail = if warm { "warm" } else { "dispatched" };
        self.mark(Phase::TargetJoined, now, Some(detail.to_owned()));
    }

    /// The source is quiet, and has been for `since` (what its request said); `detail` says
    /// how baton knows.
    fn source_quiet(&mut self, detail: &str, since: Duration, now: Instant) {
        let Some(h) = &mut self.handoff else { return };
        if h.quiet {
            return;
        }
        h.quiet = true;
        h.quiet_deadline = None;
        h.grace_deadline = None;
        h.settle_until = match detail {
            "forced" => Some(now + MUTE_SETTLE),
            // Nothing of the source was reaching the caller: nothing to let drain.
            "no_audio" => None,
            _ => {
                let settle = self.policy.quiet_settle.saturating_sub(since);
                Some(now + settle).filter(|_| !settle.is_zero())
            }
        };
        h.filler_deadline = Some(now + self.policy.max_filler);
        let source = h.source.clone();
        let present = h.source_present;
        self.mark(Phase::SourceQuiet, now, Some(detail.to_owned()));
        // Filler first: it is local and instant, while the mute is a server round trip.
        self.arm_filler();
        self.filler.on = true;
        self.out.push_back(Command::Filler(FillerCommand::On));
        self.mark(Phase::FillerOn, now, None);
        if present {
            // Enforce even when the agent says it is quiet: an adapter that forgot to turn its
            // output off must not talk over the target later.
            self.mute(&source);
        }
    }

    fn mute(&mut self, identity: &str) {
        let Some(p) = self.peers.get_mut(identity) else {
            return;
        };
        if let Some(a) = p.info.audio.as_mut().filter(|a| !a.muted) {
            a.muted = true;
            let sid = a.sid.clone();
            self.out.push_back(Command::MuteTrack { identity: identity.to_owned(), track_sid: sid });
        }
    }

    fn unmute(&mut self, identity: &str) {
        let Some(p) = self.peers.get_mut(identity) else {
            return;
        };
        if let Some(a) = p.info.audio.as_mut().filter(|a| a.muted) {
            a.muted = false;
            let sid = a.sid.clone();
            self.out.push_back(Command::UnmuteTrack { identity: identity.to_owned(), track_sid: sid });
        }
    }

    // ---- the filler ---------------------------------------------------------------------------

    fn arm_filler(&mut self) {
        if !self.filler.armed {
            self.filler.armed = true;
            self.out.push_back(Command::Filler(FillerCommand::Arm));
        }
    }

    fn disarm_filler(&mut self) {
        if self.filler.armed {
            self.filler.armed = false;
            self.out.push_back(Command::Filler(FillerCommand::Off));
        }
    }

    /// Fades the filler out and marks `filler_off` (detail: why) in the open timeline: the
    /// handoff's, or the finished one's.
    fn stop_filler(&mut self, fade: Duration, why: &str, now: Instant) {
        self.stop_source_filler(fade);
        if !self.filler.on {
            return;
        }
        self.filler.on = false;
        self.filler.hold = None;
        self.out.push_back(Command::Filler(FillerCommand::FadeOut(fade)));
        let timeline = match (&mut self.handoff, &mut self.finishing) {
            (Some(h), _) => Some(&mut h.timeline),
            (None, Some(f)) => Some(&mut f.timeline),
            (None, None) => None,
        };
        if let Some(t) = timeline {
            let ev = t.mark(Phase::FillerOff, now, Some(why.to_owned()));
            self.out.push_back(Command::Timeline(ev));
        }
    }

    /// Tells the source playing a filler of its own to fade it out over `fade`, as baton's own.
    fn stop_source_filler(&mut self, fade: Duration) {
        let Some((source, handoff)) = self.filler.source.take() else { return };
        if self.peers.contains_key(&source) {
            let fade_ms = u32::try_from(fade.as_millis()).unwrap_or(u32::MAX);
            self.send(&source, None, BatonMessage::FillerStop { handoff, fade_ms });
        }
    }

    /// The floor has just changed hands to `holder`: a playing filler holds until the caller can
    /// hear it, at most `filler_hold`.
    fn floor_changed(&mut self, holder: &str, now: Instant) {
        if self.filler.on {
            self.filler.hold = Some((holder.to_owned(), now + self.policy.filler_hold));
        } else {
            // The handoff ended before baton's filler started (its source never went quiet):
            // nothing holds, so a filler the source may have started stops now too.
            self.stop_source_filler(self.policy.filler_fade);
        }
        if self.peers.get(holder).is_some_and(|p| p.speaking) {
            self.heard(holder, now);
        }
        self.close_finished(now);
    }

    /// `identity` was heard speaking. If it is the new floor holder, the filler fades under its
    /// first words, and a completed handoff's timeline gets its `target_audible` mark.
    fn heard(&mut self, identity: &str, now: Instant) {
        if self.filler.hold.as_ref().is_some_and(|(who, _)| who == identity) {
            self.stop_filler(self.policy.filler_tail, "heard", now);
        }
        if let Some(f) = &mut self.finishing
            && f.awaiting.as_ref().is_some_and(|(who, _)| who == identity)
        {
            f.awaiting = None;
            let ev = f.timeline.mark(Phase::TargetAudible, now, None);
            self.out.push_back(Command::Timeline(ev));
        }
        self.close_finished(now);
    }

    /// Stops waiting for a finished handoff's new holder to be heard (`why`: a new handoff, the
    /// audible timeout): the filler fades now and the timeline closes.
    fn stop_waiting(&mut self, why: &str, now: Instant) {
        if self.filler.hold.is_some() {
            self.stop_filler(self.policy.filler_fade, why, now);
        }
        if let Some(f) = &mut self.finishing {
            f.awaiting = None;
        }
        self.close_finished(now);
    }

    /// Closes a finished handoff's timeline once nothing is left to wait for.
    fn close_finished(&mut self, now: Instant) {
        if self.filler.hold.is_some() || self.finishing.as_ref().is_none_or(|f| f.awaiting.is_some()) {
            return;
        }
        let Some(mut f) = self.finishing.take() else {
            return;
        };
        let ev = match (f.timeline.outcome, f.timeline.failure) {
            // A cleared suspicion ends with its `suspect_cleared` mark.
            (Some(Outcome::Cleared), _) => None,
            (_, None) => {
                f.timeline.outcome = Some(Outcome::Completed);
                Some(f.timeline.mark(Phase::Completed, now, None))
            }
            (_, Some(reason)) => Some(f.timeline.mark(Phase::Failed, now, Some(reason.as_str().to_owned()))),
        };
        self.out.extend(ev.map(Command::Timeline));
        self.out.push_back(Command::HandoffFinished(Box::new(f.timeline)));
    }

    fn on_bundle_received(&mut self, from: String, transfer_id: TransferId, bytes: u64, now: Instant) {
        if let Err(reason) = self.authorize(&from) {
            self.security(from, "bundle", reason);
            return;
        }
        if let Some(h) = &mut self.handoff {
            let matches = h.source == from
                && h.bundle.expected
                && !h.bundle.held
                && h.bundle.transfer.is_none_or(|t| t == transfer_id);
            if matches {
                h.bundle.transfer = Some(transfer_id);
                h.bundle.held = true;
                h.bundle.deadline = None;
                h.timeline.bundle_bytes = Some(bytes);
                self.mark(Phase::BundleReceived, now, None);
                return;
            }
        }
        self.hold_bundle(transfer_id, from);
    }

    /// Keeps an unclaimed bundle's id for a handoff that may name it later (a source uploads
    /// its bundle right behind its request, which may arrive after it). The oldest is forgotten
    /// beyond [`HELD_BUNDLES_MAX`], so a sender of stray transfers cannot grow the list.
    fn hold_bundle(&mut self, transfer_id: TransferId, from: String) {
        if self.held_bundles.len() >= HELD_BUNDLES_MAX {
            self.held_bundles.pop_front();
        }
        self.held_bundles.push_back((transfer_id, from));
    }

    fn on_bundle_delivered(&mut self, to: &str, transfer_id: TransferId, now: Instant) {
        let Some(h) = &mut self.handoff else { return };
        if h.target.identity.as_deref() == Some(to)
            && h.bundle.delivering
            && h.bundle.transfer == Some(transfer_id)
        {
            h.bundle.delivered = true;
            h.bundle.delivering = false;
            h.bundle.delivery_stall = None;
            if !h.target.ready
                && let Some(ready) = h.target.ready_deadline
            {
                // However late the bundle came, the target gets a moment to load it.
                h.target.ready_deadline = Some(ready.max(now + self.policy.stall_timeout));
            }
            self.mark(Phase::BundleDelivered, now, None);
        }
    }

    /// A transfer of the handoff's bundle moved: the deadline waiting on it moves with it
    /// (`stall_timeout` past now, never past `max_transfer_time`).
    fn on_transfer_progress(&mut self, peer: &str, transfer_id: TransferId, bytes: u64, now: Instant) {
        let stall = self.policy.stall_timeout;
        let Some(h) = &mut self.handoff else { return };
        let b = &mut h.bundle;
        // With `bundle_follows` the id is not known yet: any upload of the source counts.
        let upload = h.source == peer && b.expected && !b.held && b.transfer.is_none_or(|t| t == transfer_id);
        if upload && bytes > b.uploaded {
            b.uploaded = bytes;
            if let (Some(_), Some(cap)) = (b.deadline, b.upload_cap) {
                b.deadline = Some((now + stall).min(cap));
            }
            // A target waiting for a bundle still on its way cannot be ready yet either.
            let t = &mut h.target;
            if let (false, Some(ready), Some(cap)) = (t.ready, t.ready_deadline, t.transfer_cap) {
                t.ready_deadline = Some(ready.max((now + stall).min(cap)));
            }
            return;
        }
        let delivery =
            h.target.identity.as_deref() == Some(peer) && b.delivering && b.transfer == Some(transfer_id);
        if delivery && bytes > b.acknowledged {
            b.acknowledged = bytes;
            let until = h.target.transfer_cap.map_or(now + stall, |cap| (now + stall).min(cap));
            b.delivery_stall = Some(until);
            if !h.target.ready
                && let Some(ready) = h.target.ready_deadline
            {
                h.target.ready_deadline = Some(ready.max(until));
            }
        }
    }

    fn on_transfer_failed(&mut self, peer: &str, transfer_id: TransferId, now: Instant) {
        let Some(h) = &self.handoff else { return };
        if h.bundle.transfer != Some(transfer_id) && h.source != peer {
            return;
        }
        if h.target.identity.as_deref() == Some(peer) && h.bundle.delivering {
            if let Some(h) = &mut self.handoff {
                h.bundle.delivering = false;
            }
            self.fail_target(FailReason::DeliveryFailed, now);
        } else if h.source == peer && h.bundle.expected && !h.bundle.held {
            if h.source_present {
                self.abandon(FailReason::DeliveryFailed, now);
            } else {
                self.bundle_lost(now);
            }
        }
    }

    fn bundle_lost(&mut self, now: Instant) {
        let Some(h) = &mut self.handoff else { return };
        h.bundle.lost = true;
        h.bundle.deadline = None;
        let notify = h.target.prepared.then(|| h.target.identity.clone()).flatten();
        let id = h.id.clone();
        self.mark(Phase::BundleLost, now, None);
        if let Some(t) = notify {
            self.send(&t, None, BatonMessage::BundleUnavailable { handoff: id });
        }
    }

    fn on_bundle_timeout(&mut self, now: Instant) {
        let Some(h) = &mut self.handoff else { return };
        h.bundle.deadline = None;
        if h.source_present {
            // The context is the point of the handoff; without it the source keeps the call.
            self.abandon(FailReason::BundleTimeout, now);
        } else {
            self.bundle_lost(now);
        }
    }

    /// Prepares the target, delivers the bundle, and switches when everything is in place.
    fn progress(&mut self, now: Instant) {
        let Some(h) = &self.handoff else { return };
        let Some(target) = h.target.identity.clone() else {
            return;
        };
        if h.target.away_until.is_some() {
            // Gone for now: nothing to send it, and it cannot take the floor.
            return;
        }
        let reachable = self.peers.get(&target).is_some_and(|p| p.reachable);
        if !h.target.prepared && reachable {
            let msg = Self::prepare_message(h, self.policy.recovery_greeting);
            self.send(&target, None, msg);
            let mut held = Vec::new();
            if let Some(h) = &mut self.handoff {
                h.target.prepared = true;
                held = std::mem::take(&mut h.tool_results);
                held.extend(h.tails.iter().cloned());
            }
            for message in held {
                self.send(&target, None, message);
            }
        }
        let Some(h) = &mut self.handoff else { return };
        // A held bundle always has its id: the arrival that made it held named it.
        if h.target.prepared
            && h.bundle.held
            && !h.bundle.delivering
            && !h.bundle.delivered
            && let Some(transfer_id) = h.bundle.transfer
        {
            h.bundle.delivering = true;
            h.bundle.acknowledged = 0;
            h.bundle.delivery_stall = None;
            self.out.push_back(Command::DeliverBundle { transfer_id, to: target.clone() });
        }
        let Some(h) = &self.handoff else { return };
        if h.quiet && h.target.ready && h.bundle.settled() {
            if h.settle_until.is_none_or(|t| now >= t) {
                self.switch(now);
            } else if !h.target.activated {
                self.activate_early(now);
            }
        }
    }

    /// The target is ready but the settle still runs: tell it to take the floor now, so the
    /// time its reply takes to start (model, speech synthesis) runs during the settle; its
    /// track stays muted server-side until [`switch`](Self::switch) at the settle's end, so
    /// nothing of it can reach the caller before the source's last words have.
    fn activate_early(&mut self, now: Instant) {
        let Some(h) = &mut self.handoff else { return };
        let Some(target) = h.target.identity.clone() else { return };
        h.target.activated = true;
        let activation = Self::activation(h);
        self.send(&target, None, activation);
        self.mark(Phase::TargetActivated, now, Some("muted until the settle ends".to_owned()));
    }

    fn activation(h: &Handoff) -> BatonMessage {
        let cause = if h.recovery.is_some() { ActivateCause::Recovery } else { ActivateCause::Handoff };
        BatonMessage::Activate { handoff: Some(h.id.clone()), cause, reason: None }
    }

    /// Whether the `prepare` this request leads to could not be sent: refused up front rather
    /// than accepted and found unsendable with the caller on filler (issue 11 item 2). Sized for
    /// the longest handoff id baton mints and, when the bundle's id is not known yet, a transfer
    /// id (every one is 32 digits in text, docs/protocol.md, "Transfer ids in control messages").
    fn prepare_unsendable(
        source: &str,
        reason: &str,
        transfer: Option<TransferId>,
        bundle_follows: bool,
    ) -> Option<RefuseReason> {
        let expected = transfer.is_some() || bundle_follows;
        let transfer = transfer.or_else(|| expected.then(TransferId::default));
        let prepare = |reason: &str| BatonMessage::Prepare {
            handoff: format!("h-{}", u64::MAX),
            source: source.to_owned(),
            reason: reason.to_owned(),
            transfer,
            bundle: expected,
            cause: None,
            greeting: None,
        };
        if prepare(reason).envelope_len(None) <= MAX_CONTROL_MESSAGE {
            None
        } else if prepare("").envelope_len(None) <= MAX_CONTROL_MESSAGE {
            Some(RefuseReason::ReasonTooLong)
        } else {
            Some(RefuseReason::MessageTooLarge)
        }
    }

    /// The `prepare` for the current target, from what baton knows now.
    fn prepare_message(h: &Handoff, greeting: bool) -> BatonMessage {
        let recovery = h.recovery.is_some();
        BatonMessage::Prepare {
            handoff: h.id.clone(),
            source: h.source_name.clone(),
            reason: h.reason.clone(),
            transfer: h.bundle.transfer,
            bundle: h.bundle.expected && !h.bundle.lost,
            cause: recovery.then_some(ActivateCause::Recovery),
            greeting: recovery.then_some(greeting),
        }
    }

    /// The target takes the floor: activate and unmute it; the filler plays on until it is heard.
    fn switch(&mut self, now: Instant) {
        let Some(h) = &self.handoff else { return };
        let Some(target) = h.target.identity.clone() else {
            return;
        };
        let id = h.id.clone();
        let activation = Self::activation(h);
        if !h.target.activated {
            self.send(&target, None, activation.clone());
            self.mark(Phase::TargetActivated, now, None);
        }
        self.unmute(&target);
        let Some(mut h) = self.handoff.take() else {
            return;
        };
        h.timeline.target = h.target.name.clone();
        self.holder = Some(Holder { identity: target.clone(), activated: true, activation });
        self.watch_from(&target, now);
        if h.source_present {
            self.send(&h.source, None, BatonMessage::Release { handoff: id, mode: self.policy.release });
            if self.policy.release == ReleasePolicy::Leave {
                self.releases.insert(h.source.clone(), now + self.policy.release_grace);
            }
        }
        let awaiting = Some((target.clone(), now + self.policy.audible_timeout));
        self.finishing = Some(Finishing { timeline: h.timeline, awaiting });
        self.floor_changed(&target, now);
        if self.peers.get(&target).is_some_and(|p| p.speaking) {
            // Activated before the settle's end, it is speaking already: its words reach the
            // caller from the unmute on.
            self.heard(&target, now);
        }
    }

    fn on_gave_up(&mut self, g: GaveUp, now: Instant) {
        if g.purpose == Purpose::Start {
            self.start_alternate(&g.agent, now);
            return;
        }
        let Some(h) = &mut self.handoff else { return };
        let waiting = h.target.identity.is_none() && !h.target.dispatching && h.target.name == g.agent;
        if matches!(g.purpose, Purpose::Standby(_)) && waiting && h.target.away_until.is_none() {
            // The standby the handoff waited for never came: dispatch the target itself.
            return self.acquire_target(now);
        }
        if g.purpose == Purpose::Handoff(h.id.clone()) && h.target.name == g.agent {
            h.target.dispatching = false;
            let reason = if g.api_failed { FailReason::DispatchFailed } else { FailReason::TargetNoShow };
            self.fail_target(reason, now);
        }
    }

    /// The starting agent (or one of its alternates) never came: dispatch the next alternate in
    /// the configured order, so the caller is not left alone with the filler.
    fn start_alternate(&mut self, failed: &str, now: Instant) {
        let Some(start) = self.policy.starting_agent.clone() else { return };
        if self.holder.is_some() {
            return;
        }
        let alternates = self.policy.alternates.get(&start).cloned().unwrap_or_default();
        let order: Vec<String> = std::iter::once(start).chain(alternates).collect();
        let Some(next) = order.iter().position(|a| a == failed).and_then(|i| order.get(i + 1)).cloned()
        else {
            return;
        };
        if let Some(identity) = self.find_agent(&next, &[]) {
            self.holder = Some(Holder::at_start(identity));
            self.activate_holder_if_reachable(now);
            return;
        }
        let meta = serde_json::json!({"baton": {"purpose": "start", "instead_of": failed}}).to_string();
        self.dispatcher.request(&next, Purpose::Start, self.policy.start_dispatch, meta, now, &mut self.out);
    }

    /// Tells the current target it will not get the floor and stops everything in flight for it.
    fn drop_target(&mut self, reason: FailReason) {
        let Some(h) = &mut self.handoff else { return };
        let id = h.id.clone();
        if h.target.dispatching {
            h.target.dispatching = false;
            self.dispatcher.cancel(&Purpose::Handoff(id.clone()), &mut self.out);
        }
        let Some(h) = &mut self.handoff else { return };
        h.target.ready_deadline = None;
        let activated = std::mem::take(&mut h.target.activated);
        let Some(t) = h.target.identity.take() else {
            return;
        };
        h.failed_targets.push(t.clone());
        if h.bundle.delivering {
            h.bundle.delivering = false;
            if let Some(transfer_id) = h.bundle.transfer {
                self.out.push_back(Command::CancelTransfer { transfer_id, to: t.clone() });
            }
        }
        if let Some(h) = &mut self.handoff {
            h.bundle.delivered = false;
        }
        if self.peers.contains_key(&t) {
            if activated {
                // It was told to take the floor before the settle's end: take it back first.
                let deactivate =
                    BatonMessage::Deactivate { handoff: Some(id.clone()), reason: DeactivateReason::Standby };
                self.send(&t, None, deactivate);
            }
            self.send(&t, None, BatonMessage::HandoffCancelled { handoff: id, reason });
            self.mute(&t);
        }
    }

    /// The current target cannot take the call: try the next alternate, else fall back.
    fn fail_target(&mut self, reason: FailReason, now: Instant) {
        if self.handoff.is_none() {
            return;
        }
        self.drop_target(reason);
        self.mark(Phase::TargetFailed, now, Some(reason.as_str().to_owned()));
        let Some(h) = &mut self.handoff else { return };
        let Some(next) = h.alternates.pop_front() else {
            return self.conclude_failure(reason, now);
        };
        h.target = Target::new(next.clone());
        h.timeline.target = next.clone();
        self.mark(Phase::AlternateTried, now, Some(next));
        self.acquire_target(now);
    }

    /// Gives up on the whole handoff (no alternate would help).
    fn abandon(&mut self, reason: FailReason, now: Instant) {
        if self.handoff.is_none() {
            return;
        }
        self.drop_target(reason);
        self.conclude_failure(reason, now);
    }

    /// The filler limit: decide now, whatever is pending.
    fn fall_back(&mut self, reason: FailReason, now: Instant) {
        self.abandon(reason, now);
    }

    /// Ends a failed handoff: the source gets the floor back if it is still here.
    fn conclude_failure(&mut self, reason: FailReason, now: Instant) {
        let Some(h) = &self.handoff else { return };
        let id = h.id.clone();
        let source = h.source.clone();
        let target_name = h.target.name.clone();
        if h.source_present {
            self.send(
                &source,
                None,
                BatonMessage::HandoffFailed { handoff: id.clone(), target: target_name, reason },
            );
            let activation = BatonMessage::Activate {
                handoff: Some(id),
                cause: ActivateCause::Handback,
                reason: Some(reason),
            };
            self.send(&source, None, activation.clone());
            self.unmute(&source);
            self.mark(Phase::HandedBack, now, Some(reason.as_str().to_owned()));
            self.holder = Some(Holder { identity: source.clone(), activated: true, activation });
            self.watch_from(&source, now);
            self.close_failed(Outcome::HandedBack, reason);
            self.floor_changed(&source, now);
        } else if h.recovery.is_some() {
            // Nothing could take the call: the caller hears the filler on to its hold limit,
            // then it fades (never silence without a sign). An agent of this name that joins
            // later still gets the call and the checkpoint.
            let agent = h.source_name.clone();
            self.out.push_back(Command::Alert(Alert::RecoveryFailed {
                agent: agent.clone(),
                identity: source.clone(),
                reason,
            }));
            self.vacated_by = Some(agent);
            if self.filler.on {
                self.filler.hold = Some((source, now + self.policy.filler_hold));
            }
            self.close_failed(Outcome::Failed, reason);
            self.close_finished(now);
        } else {
            self.stop_filler(self.policy.filler_fade, "no_holder", now);
            self.out.push_back(Command::Alert(Alert::FloorVacant { identity: source }));
            self.close_failed(Outcome::Failed, reason);
            self.close_finished(now);
        }
    }

    /// Ends a failed handoff; its timeline stays open (see [`Finishing`]) until the filler has
    /// stopped.
    fn close_failed(&mut self, outcome: Outcome, reason: FailReason) {
        let Some(mut h) = self.handoff.take() else {
            return;
        };
        if let Some(t) = &h.bundle.transfer {
            // A bundle baton still holds may be handed to a later handoff from the same source.
            if h.bundle.held && h.source_present {
                let (t, source) = (*t, h.source.clone());
                self.hold_bundle(t, source);
            }
        }
        h.timeline.outcome = Some(outcome);
        h.timeline.failure = Some(reason);
        self.finishing = Some(Finishing { timeline: h.timeline, awaiting: None });
    }

    /// The caller is gone: cancel everything, cut the filler, and tell the shell to leave.
    fn end_session(&mut self, now: Instant) {
        self.drop_target(FailReason::CallerLeft);
        self.stop_filler(Duration::ZERO, "caller_left", now);
        self.close_failed(Outcome::Failed, FailReason::CallerLeft);
        self.stop_waiting("caller_left", now);
        self.disarm_filler();
        self.dispatcher.cancel_all(&mut self.out);
        self.releases.clear();
        self.holder = None;
        self.ended = true;
        self.out.push_back(Command::SessionEnded);
    }

    /// One voice at a time: any configured agent whose track is live but who may not be heard
    /// now is muted server-side, whatever it was told.
    fn enforce_mutes(&mut self) {
        let allowed: Option<String> = match (&self.holder, &self.handoff) {
            (Some(h), _) => Some(h.identity.clone()),
            (None, Some(h)) if !h.quiet => Some(h.source.clone()),
            _ => None,
        };
        let offenders: Vec<String> = self
            .peers
            .values()
            .filter(|p| self.is_managed(&p.info) && p.info.audio_live())
            .filter(|p| Some(&p.info.identity) != allowed.as_ref())
            .map(|p| p.info.identity.clone())
            .collect();
        for who in offenders {
            self.mute(&who);
        }
    }
}
