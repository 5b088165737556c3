//! baton's logic in one room: the glue between the room task and the sans-IO cores.
//!
//! The floor arbiter (`baton_floor`) decides; this module translates what the room reports into
//! arbiter events, and the arbiter's commands into data packets, filler changes and server API
//! calls (run off the room loop as tasks). It holds no sockets and never blocks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use baton_floor::{
    Alert, Arbiter, AudioTrack, Command, DispatchTicket, Event, Participant, ParticipantKind, Policy,
};
use livekit_protocol as proto;

use crate::observe::{Stat, TraceParent};
use crate::protocol::{self, control};
use crate::relay::{Relay, RelayConfig, RelayEvent, Routing, Transmit};
use crate::room::{Change, Incoming, Member, Outbox, RoomHandler, Roster};
use crate::server_api::{ApiCall, ApiReply, ApiResult, ServerApi};

/// The participant attribute in which livekit-agents publishes its state; `speaking` while it
/// plays speech.
const AGENT_STATE: &str = "lk.agent.state";

/// What a room's coordinator needs to know.
pub struct CoordinatorConfig {
    /// The LiveKit room name (server API calls need it).
    pub room: String,
    /// The handoff policy; with no agents configured, baton only answers `ping`.
    pub policy: Policy,
    /// Server API access for dispatch and mute; `None` disables both (tests, diagnostics).
    pub api: Option<Arc<ServerApi>>,
    /// Echo `baton.echo` packets back to their sender (a data-path check for adapters).
    pub echo: bool,
    /// Send each handoff's trace ids to the agents (`traceparent`): set while baton exports
    /// traces, so the adapters' spans have a parent that exists.
    pub trace_context: bool,
}

/// How many handoffs' trace ids a room keeps at once: one runs at a time, and an entry whose
/// handoff never finished (baton left mid-handoff) must not pile up.
const TRACE_PARENTS_KEPT: usize = 4;

/// The per-room coordinator: the room task's [`RoomHandler`], with no IO of its own.
///
/// Its methods are [`RoomHandler`]'s. The `on_*` methods are the mutations (a data packet, a
/// roster change, a connection, a server API result, a timeout); each takes the current time
/// and the [`Outbox`] to fill, and runs the arbiter ⇄ relay exchange inside until neither has
/// anything new. [`poll_timeout`](RoomHandler::poll_timeout) says when `on_timeout` is due;
/// [`finished`](RoomHandler::finished) and [`server_api`](RoomHandler::server_api) are getters.
///
/// After any mutation, poll until you get the timeout: carry out the Outbox the call filled
/// (packets, filler changes, API calls, event lines), then ask `poll_timeout` when to call
/// `on_timeout` next.
pub struct Coordinator {
    cfg: CoordinatorConfig,
    arbiter: Option<Arbiter>,
    /// The arbiter starts once baton knows which agents the room's token already dispatched.
    started: bool,
    finished: bool,
    /// Who is in the room as the arbiter sees them, kept from the start so the arbiter can be
    /// started with the room as it is when the dispatch list arrives.
    members: BTreeMap<String, Participant>,
    /// Control messages from identities the room has not announced yet. Data packets and the
    /// signal's participant updates travel separately, so an agent's `hello` can overtake the
    /// news that it joined; such messages wait here briefly instead of being judged unknown.
    early: Vec<(Instant, Incoming)>,
    /// Context transfer (`baton.xfer`): receives, stores and delivers bundles.
    pub relay: Relay,
    /// The trace ids of the handoffs under way (oldest first), by handoff id.
    trace_parents: std::collections::VecDeque<(String, TraceParent)>,
    /// The room's durable state, when the worker has a state store (issue 14).
    durable: Option<Durable>,
}

/// What the coordinator keeps to write the room's state to the store: the last record it
/// wrote, and the checkpoints whose COMPLETE waits for their write.
struct Durable {
    client: crate::store::RoomStoreClient,
    /// The record as last written (compared without its time stamp).
    written: crate::store::RoomRecord,
    /// The record as it is now: floor, handoff and its last phase, timeline.
    current: crate::store::RoomRecord,
    /// Store write tag -> the checkpoint (source, transfer id) whose COMPLETE waits for it.
    acks: std::collections::HashMap<u64, (String, baton_transfer::TransferId)>,
    next_tag: u64,
}

/// Tag of store writes nobody waits on (the room record, forgetting the room).
const UNTRACKED_WRITE: u64 = 0;

/// How long a message from a not-yet-announced participant waits for the announcement. The
/// server batches its news of a participant that publishes no track for up to about 3 s
/// (measured: issue 11, item 3); 5 s covers that with margin.
pub const EARLY_MESSAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// At most this many such messages wait at once (a flood from unknown senders is dropped).
/// Enough for an OPEN and a whole default window of chunks (33 frames, about 500 KB).
const EARLY_MESSAGE_MAX: usize = 40;

impl Coordinator {
    pub fn new(cfg: CoordinatorConfig, now: Instant) -> Result<Self, baton_floor::PolicyError> {
        let relay = Relay::new(RelayConfig {
            allowed_agents: cfg.policy.agents.clone(),
            // Without configured agents there is no arbiter to decide deliveries; bundles then
            // go where their metadata says (`"to"`), still only to agent participants.
            routing: if cfg.policy.agents.is_empty() { Routing::MetaTarget } else { Routing::OnCommand },
            ..RelayConfig::default()
        });
        let arbiter =
            if cfg.policy.agents.is_empty() { None } else { Some(Arbiter::new(cfg.policy.clone(), now)?) };
        let mut coordinator = Self {
            cfg,
            arbiter,
            started: false,
            finished: false,
            members: BTreeMap::new(),
            early: Vec::new(),
            relay,
            trace_parents: std::collections::VecDeque::new(),
            durable: None,
        };
        coordinator.sync_uploaders();
        Ok(coordinator)
    }

    /// A coordinator that only answers `ping` (and echoes when asked): no agents, no server API.
    pub fn minimal(room: &str, echo: bool) -> Self {
        Self {
            cfg: CoordinatorConfig {
                room: room.to_string(),
                policy: Policy::default(),
                api: None,
                echo,
                trace_context: false,
            },
            arbiter: None,
            started: false,
            finished: false,
            members: BTreeMap::new(),
            early: Vec::new(),
            relay: Relay::new(RelayConfig { routing: Routing::MetaTarget, ..RelayConfig::default() }),
            trace_parents: std::collections::VecDeque::new(),
            durable: None,
        }
    }

    /// Keeps the room's state in `client`'s store from now on, starting from `restored` (what
    /// the store held when this baton joined: the merged checkpoints are applied again, as
    /// from their owners, so a later handoff or recovery carries turns from before this baton
    /// came). From then on each checkpoint's COMPLETE goes to the agent only once its merged
    /// state is durable, and the room record (floor, handoff, timeline) is written when it
    /// changes.
    pub fn with_store(
        mut self,
        client: crate::store::RoomStoreClient,
        restored: crate::store::Snapshot,
    ) -> Self {
        for (agent, (owner, payload)) in &restored.checkpoints {
            match self.relay.restore_checkpoint(owner, agent, payload) {
                Ok(()) => {
                    tracing::info!(room = %self.cfg.room, %agent, %owner, bytes = payload.len(), "checkpoint restored from the state store")
                }
                Err(e) => {
                    tracing::warn!(room = %self.cfg.room, %agent, error = %e, "stored checkpoint does not apply; dropped")
                }
            }
        }
        let mut current = restored.record.unwrap_or_default();
        if let Some(floor) = &current.floor {
            tracing::info!(room = %self.cfg.room, holder = %floor.identity, agent = %floor.agent, "state store: the floor was held by this agent");
        }
        current.written_by = client.holder.clone();
        self.relay.hold_checkpoint_acks(true);
        self.durable = Some(Durable {
            client,
            written: current.clone(),
            current,
            acks: std::collections::HashMap::new(),
            next_tag: UNTRACKED_WRITE + 1,
        });
        self
    }

    /// A baton that comes back to a room gives the floor to whoever the store says held it, if
    /// that agent is still in the room. A handoff the previous baton left unfinished fails
    /// cleanly: its source gets the floor back (or, when the source is gone, its target); the
    /// other is told to stand by when it says hello.
    fn restore_floor(&mut self, participants: &[Participant]) {
        let (Some(d), Some(arbiter)) = (self.durable.as_ref(), self.arbiter.as_mut()) else { return };
        let record = &d.current;
        let mut candidates: Vec<&str> = Vec::new();
        candidates.extend(record.floor.as_ref().map(|f| f.identity.as_str()));
        if let Some(h) = &record.handoff {
            candidates.push(h.source.as_str());
            candidates.extend(h.target_identity.as_deref());
        }
        for identity in candidates {
            if arbiter.restore_holder(identity, participants) {
                let unfinished = record.handoff.as_ref().map(|h| h.id.as_str());
                tracing::info!(room = %self.cfg.room, %identity, ?unfinished, "floor restored from the state store");
                return;
            }
        }
    }

    /// Asks for the merged state of `agent` to be written; its COMPLETE to `from` waits for it.
    fn store_checkpoint(
        &mut self,
        from: String,
        id: baton_transfer::TransferId,
        agent: &str,
        out: &mut Outbox,
    ) {
        let Some(d) = self.durable.as_mut() else { return };
        let Some(merged) = self.relay.checkpoints().get(agent) else { return };
        let write = crate::store::Write::Checkpoint {
            agent: agent.to_owned(),
            owner: merged.owner().to_owned(),
            payload: merged.base_checkpoint(),
        };
        let tag = d.next_tag;
        d.next_tag += 1;
        d.acks.insert(tag, (from, id));
        out.store.push((tag, write));
    }

    /// After a store outage during which this room held its lease, the backend may have lost
    /// the room's state (a Redis restarted without persistence comes back empty): the record
    /// and every merged checkpoint are written again, so a baton that takes the room over
    /// later restores it from the store rather than from the config.
    fn resync_if_lost(&mut self, out: &mut Outbox) {
        let Some(d) = self.durable.as_mut() else { return };
        if self.finished || !d.client.handle.status().take_lost(&d.client.room) {
            return;
        }
        tracing::info!(room = %self.cfg.room, "writing the room's whole state to the store again after its outage");
        d.written = crate::store::RoomRecord::default(); // sync_record writes the record again
        for agent in self.relay.checkpoints().agents() {
            let Some(merged) = self.relay.checkpoints().get(agent) else { continue };
            let write = crate::store::Write::Checkpoint {
                agent: agent.to_owned(),
                owner: merged.owner().to_owned(),
                payload: merged.base_checkpoint(),
            };
            out.store.push((UNTRACKED_WRITE, write));
        }
    }

    /// Writes the room record when the floor, the handoff or the timeline changed.
    fn sync_record(&mut self, out: &mut Outbox) {
        if self.finished {
            return; // forgotten: nothing is written after the session ended
        }
        let Some(d) = self.durable.as_mut() else { return };
        if let Some(arbiter) = self.arbiter.as_ref().filter(|_| self.started) {
            d.current.floor = arbiter.floor_holder().map(|identity| crate::store::FloorRecord {
                identity: identity.to_owned(),
                agent: self.members.get(identity).and_then(|p| p.agent_name.clone()).unwrap_or_default(),
            });
            let phase = d.current.handoff.as_ref().map(|h| h.phase.clone());
            d.current.handoff = arbiter.handoff().map(|h| crate::store::HandoffRecord {
                phase: phase
                    .clone()
                    .filter(|_| d.current.handoff.as_ref().is_some_and(|o| o.id == h.id))
                    .unwrap_or_else(|| "requested".into()),
                id: h.id,
                source: h.source,
                target: h.target_name,
                target_identity: h.target_identity,
            });
        }
        let mut stamped = d.current.clone();
        stamped.updated_at_ms = d.written.updated_at_ms;
        if stamped == d.written {
            return;
        }
        d.current.updated_at_ms = crate::store::epoch_ms();
        d.written = d.current.clone();
        out.store.push((UNTRACKED_WRITE, crate::store::Write::Record(d.current.clone())));
    }

    /// Notes a timeline mark in the room record.
    fn note_timeline(&mut self, handoff: &str, phase: Option<String>, line: String) {
        let Some(d) = self.durable.as_mut() else { return };
        if let (Some(h), Some(phase)) = (d.current.handoff.as_mut(), phase)
            && h.id == handoff
        {
            h.phase = phase;
        }
        d.current.push_timeline(line);
    }

    /// Hands one event to the arbiter and carries out what follows.
    fn feed(&mut self, event: Event, now: Instant, out: &mut Outbox) {
        self.arbiter_handle(event, now);
        self.exchange(now, out);
    }

    /// Hands one event to the arbiter, once it has started: events before the start are
    /// reflected in the participant list `RoomJoined` carries, and control messages that early
    /// are dropped by the arbiter anyway.
    fn arbiter_handle(&mut self, event: Event, now: Instant) {
        if let Some(arbiter) = self.arbiter.as_mut().filter(|_| self.started) {
            arbiter.handle(event, now);
        }
    }

    /// The arbiter ⇄ relay exchange, a loop in the open (as quinn's endpoint and connections
    /// trade their events): publish the relay's packets (bulk priority, so a bundle on the wire
    /// never delays a control message), hand its events to the arbiter, carry out the arbiter's
    /// commands (a delivery makes the relay report again), and round again until neither has
    /// anything new. The two never call each other. Called after every input to either.
    fn exchange(&mut self, now: Instant, out: &mut Outbox) {
        loop {
            while let Some(Transmit { to, payload }) = self.relay.poll_transmit() {
                out.send_bulk(baton_transfer::TOPIC, payload, &to);
            }
            while let Some(event) = self.relay.poll_event() {
                if let RelayEvent::CheckpointApplied { from, transfer_id, agent, .. } = &event {
                    self.store_checkpoint(from.clone(), *transfer_id, agent, out);
                }
                out.stats.extend(relay_stat(&event));
                if let Some(event) = arbiter_event(event) {
                    self.arbiter_handle(event, now);
                }
            }
            let commands = match self.arbiter.as_mut().filter(|_| self.started) {
                Some(arbiter) => arbiter.drain_commands(),
                None => Vec::new(),
            };
            if commands.is_empty() {
                self.sync_uploaders();
                self.resync_if_lost(out);
                self.sync_record(out);
                return;
            }
            for command in commands {
                self.execute(command, now, out);
            }
        }
    }

    /// Tells the relay who may upload bundles now: the floor holder and the source of the
    /// handoff under way (nobody before the arbiter starts). Without agents configured there
    /// is no floor, and every agent may.
    fn sync_uploaders(&mut self) {
        let Some(arbiter) = self.arbiter.as_ref() else { return };
        let mut uploaders = std::collections::BTreeSet::new();
        if self.started {
            uploaders.extend(arbiter.floor_holder().map(str::to_owned));
            uploaders.extend(arbiter.handoff().map(|h| h.source));
        }
        self.relay.set_uploaders(Some(uploaders));
    }

    /// The trace ids of a handoff under way (chosen at its first timeline mark).
    fn trace_parent(&self, handoff: &str) -> Option<TraceParent> {
        self.trace_parents.iter().find(|(h, _)| h == handoff).map(|(_, t)| *t)
    }

    /// The trace ids of a handoff that just finished; they are not sent again.
    fn take_trace_parent(&mut self, handoff: &str) -> Option<TraceParent> {
        let at = self.trace_parents.iter().position(|(h, _)| h == handoff)?;
        self.trace_parents.remove(at).map(|(_, t)| t)
    }

    fn start(&mut self, token_dispatched: Vec<String>, now: Instant, out: &mut Outbox) {
        if self.started || self.arbiter.is_none() {
            return;
        }
        self.started = true;
        let participants: Vec<Participant> = self.members.values().cloned().collect();
        self.restore_floor(&participants);
        tracing::info!(room = %self.cfg.room, ?token_dispatched, "floor arbiter started");
        self.feed(Event::RoomJoined { participants, token_dispatched }, now, out);
    }

    /// Carries out one of the arbiter's commands (what the relay does about one, it reports
    /// through its own queues, which [`exchange`](Self::exchange) polls).
    fn execute(&mut self, command: Command, now: Instant, out: &mut Outbox) {
        if let Some(mut event) = crate::observe::Event::from_command(&command) {
            if let crate::observe::Event::HandoffFinished(t, trace) = &mut event {
                *trace = self.take_trace_parent(&t.handoff);
            }
            out.events.push(event);
        }
        match command {
            Command::Send { to, re, message } => {
                tracing::debug!(%to, kind = message.type_name(), "control message to agent");
                let traceparent = message.handoff().and_then(|h| self.trace_parent(h)).map(|t| t.to_string());
                if let Some(payload) = control::encode(&message, re.as_deref(), traceparent) {
                    out.send(protocol::TOPIC_CONTROL, payload, &to);
                }
            }
            Command::MuteTrack { identity, track_sid } => {
                self.call(0, ApiCall::MuteTrack { identity, track_sid, muted: true }, out)
            }
            Command::UnmuteTrack { identity, track_sid } => {
                self.call(0, ApiCall::MuteTrack { identity, track_sid, muted: false }, out)
            }
            Command::Filler(filler) => out.filler.push(filler),
            Command::CreateDispatch { ticket, agent_name, metadata } => {
                tracing::info!(agent = %agent_name, "dispatching agent");
                // The ticket rides as the call's tag, so the result finds its dispatch.
                self.call(ticket.0, ApiCall::CreateDispatch { agent_name, metadata }, out);
            }
            Command::DeleteDispatch { dispatch_id, agent_name } => {
                tracing::debug!(agent = %agent_name, %dispatch_id, "deleting dispatch");
                self.call(0, ApiCall::DeleteDispatch { dispatch_id }, out);
            }
            Command::DeliverBundle { transfer_id, to } => {
                if let Err(e) = self.relay.deliver(transfer_id, &to, now) {
                    tracing::warn!(%to, error = %e, "could not deliver bundle");
                }
            }
            Command::CancelTransfer { transfer_id, to } => {
                // Deliveries have their own ids; the relay cancels every delivery of this
                // bundle to `to`.
                self.relay.cancel_deliveries(transfer_id, &to, "handoff cancelled", now);
            }
            Command::RemoveParticipant { identity } => {
                self.call(0, ApiCall::RemoveParticipant { identity }, out)
            }
            Command::AgentCrashed { identity, agent, recovery, reason } => {
                tracing::warn!(%identity, %agent, %recovery, %reason, "agent crashed; replacing it from its last checkpoint");
                self.relay.declare_stale(&identity, now);
                let created_at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                // None (logged by the relay): the replacement starts without the context.
                let bundle = self.relay.recovery_bundle(&agent, &recovery, &reason, created_at, now);
                // The commands still queued were decided before this answer; the arbiter
                // handles it now and the exchange carries out what follows.
                self.arbiter_handle(Event::RecoveryBundle { recovery, bundle }, now);
            }
            Command::CheckJob { identity } => self.call(0, ApiCall::JobStatus { identity }, out),
            Command::Timeline(ev) => {
                if self.cfg.trace_context && self.trace_parent(&ev.handoff).is_none() {
                    if self.trace_parents.len() == TRACE_PARENTS_KEPT {
                        self.trace_parents.pop_front();
                    }
                    self.trace_parents.push_back((ev.handoff.clone(), TraceParent::random()));
                }
                if self.durable.is_some() {
                    let phase =
                        serde_json::to_value(ev.mark.phase).ok().and_then(|v| v.as_str().map(str::to_owned));
                    let line = serde_json::to_string(&ev).unwrap_or_default();
                    self.note_timeline(&ev.handoff, phase, line);
                }
                tracing::info!(
                    handoff = %ev.handoff,
                    phase = ?ev.mark.phase,
                    ms = ev.mark.ms,
                    detail = ev.mark.detail.as_deref().unwrap_or(""),
                    "handoff phase"
                );
            }
            Command::HandoffFinished(timeline) => {
                tracing::info!(timeline = %timeline.to_json_line(), "handoff finished");
            }
            Command::Security(ev) => {
                tracing::warn!(
                    target: crate::logging::SECURITY_TARGET,
                    from = %ev.from,
                    message = ev.message_type,
                    reason = ?ev.reason,
                    "security: control message ignored"
                );
            }
            Command::Alert(alert) => log_alert(&alert),
            Command::SessionEnded => {
                tracing::info!(room = %self.cfg.room, "session ended");
                if self.durable.is_some() {
                    // Nothing of a call that is over should outlive it, nor bring a baton back.
                    out.store.push((UNTRACKED_WRITE, crate::store::Write::Forget));
                }
                self.finished = true;
            }
        }
    }

    /// Asks the room task for a server API call, unless there is no server API to call.
    fn call(&self, tag: u64, call: ApiCall, out: &mut Outbox) {
        if self.cfg.api.is_none() {
            tracing::warn!("no server API configured: cannot {call}");
            return;
        }
        out.call(tag, call);
    }

    /// Keeps a message from a sender the roster does not know yet, until it is announced (see
    /// `early`); beyond [`EARLY_MESSAGE_MAX`] waiting messages, drops it.
    fn hold_early(&mut self, msg: &Incoming, now: Instant) {
        if self.early.len() < EARLY_MESSAGE_MAX {
            tracing::debug!(from = %msg.from, topic = %msg.topic, "message before the sender's join; holding it");
            self.early.push((now, msg.clone()));
        } else {
            tracing::warn!(from = %msg.from, "too many messages from unannounced participants; dropped");
        }
    }

    /// Hands held messages on (control to the arbiter, transfer frames to the relay) once their
    /// sender is announced, and gives up waiting on the ones that waited too long (they are
    /// then judged as from an unknown sender).
    fn release_early(&mut self, now: Instant, out: &mut Outbox) {
        if self.early.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.early);
        for (at, msg) in held {
            if self.members.contains_key(&msg.from) || now.duration_since(at) >= EARLY_MESSAGE_WAIT {
                if msg.topic == baton_transfer::TOPIC {
                    self.relay.handle_packet(&msg.from, &msg.payload, now);
                    self.exchange(now, out);
                } else {
                    self.on_control(&msg, now, out, false);
                }
            } else {
                self.early.push((at, msg));
            }
        }
    }

    /// `may_hold`: a message from a sender the room has not announced yet is held back for the
    /// announcement (false when it is being released from that hold).
    fn on_control(&mut self, msg: &Incoming, now: Instant, out: &mut Outbox, may_hold: bool) {
        use control::{DecodeError, Inbound, Reply};
        let kind = self.members.get(&msg.from).map(|p| p.kind);
        if kind.is_none() && may_hold {
            return self.hold_early(msg, now);
        }
        // A `ping` is answered to anyone the room announced (a liveness probe need not be an
        // agent); a version error only to agents: a reply to a caller's client would be noise
        // on a participant that does not speak the protocol.
        let is_agent = kind == Some(ParticipantKind::Agent);
        let answer = |reply: &Reply, re: &str, out: &mut Outbox| {
            if let Some(payload) = control::encode(reply, Some(re), None) {
                out.send(protocol::TOPIC_CONTROL, payload, &msg.from);
            }
        };
        let refuse = |why: &str| {
            tracing::warn!(target: crate::logging::SECURITY_TARGET, from = %msg.from, ?kind, "security: {why}");
        };
        let env = match control::decode(&msg.payload) {
            Ok(env) => env,
            Err(DecodeError::UnsupportedVersion { id, version }) if is_agent => {
                return answer(&Reply::unsupported_version(version), &id, out);
            }
            Err(e) => {
                out.stats.push(Stat::ControlUndecodable(e.name()));
                return refuse(&format!("rejected control message: {e}"));
            }
        };
        let message = match env.message {
            Inbound::Ping if kind.is_some() => return answer(&Reply::Pong, &env.id, out),
            Inbound::Ping => return refuse("ping from a participant the room never announced; dropped"),
            // The arbiter judges the sender (kind, agent name, role) and reports a refusal as a
            // security event; it never answers one.
            Inbound::Agent(message) => message,
        };
        if self.arbiter.is_none() {
            let kind = message.type_name();
            tracing::warn!(from = %msg.from, kind, "no agents configured: control message ignored");
            return;
        }
        self.feed(Event::Control { from: msg.from.clone(), id: env.id, message }, now, out);
    }
}

impl RoomHandler for Coordinator {
    fn on_data(&mut self, msg: &Incoming, now: Instant, out: &mut Outbox) {
        match msg.topic.as_str() {
            protocol::TOPIC_CONTROL => self.on_control(msg, now, out, true),
            baton_transfer::TOPIC => {
                // A transfer can start the moment an agent has joined, before the server has
                // told baton so; dropped, its OPEN would wait for the sender's 1 s timeout.
                if !self.members.contains_key(&msg.from) {
                    self.hold_early(msg, now);
                    return;
                }
                self.relay.handle_packet(&msg.from, &msg.payload, now);
                self.exchange(now, out);
            }
            protocol::TOPIC_ECHO if self.cfg.echo => {
                out.send(protocol::TOPIC_ECHO, msg.payload.clone(), &msg.from);
            }
            topic => {
                tracing::debug!(from = %msg.from, %topic, bytes = msg.payload.len(), "ignored data packet")
            }
        }
    }

    fn on_change(&mut self, change: &Change, _roster: &Roster, now: Instant, out: &mut Outbox) {
        self.relay.handle_change(change, now);
        self.exchange(now, out);
        let state_change = speaking_change(change);
        let event = match change {
            Change::Joined(m) => {
                let p = participant(m);
                self.members.insert(p.identity.clone(), p.clone());
                Some(Event::ParticipantJoined(p))
            }
            Change::Updated { after, .. } => {
                let p = participant(after);
                // Most updates (metadata, connection quality...) change nothing the floor cares
                // about.
                (self.members.get(&p.identity) != Some(&p)).then(|| {
                    self.members.insert(p.identity.clone(), p.clone());
                    Event::ParticipantUpdated(p)
                })
            }
            Change::Left(m) => {
                self.members.remove(&m.identity);
                Some(Event::ParticipantLeft { identity: m.identity.clone() })
            }
        };
        if let Some(event) = event {
            self.feed(event, now, out);
            self.release_early(now, out);
        }
        if let Some((identity, speaking)) = state_change {
            self.on_speaking(&identity, speaking, now, out);
        }
    }

    fn on_speaking(&mut self, identity: &str, speaking: bool, now: Instant, out: &mut Outbox) {
        self.feed(Event::SpeakingChanged { identity: identity.to_string(), speaking }, now, out);
    }

    fn on_connected(&mut self, roster: &Roster, now: Instant, out: &mut Outbox) {
        self.relay.handle_connected(roster, now);
        self.exchange(now, out);
        // Also without agents configured: who is announced decides whether early messages are
        // held and whether a control message is answered.
        self.members = roster.members().map(|m| (m.identity.clone(), participant(m))).collect();
        self.release_early(now, out);
        if self.started || self.arbiter.is_none() {
            return;
        }
        if self.cfg.api.is_some() {
            // The starting agent may already be dispatched by the room's token; dispatching it
            // again would put two of them in the call.
            out.call(0, ApiCall::ListDispatch);
        } else {
            self.start(Vec::new(), now, out);
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let arbiter = self.arbiter.as_ref().filter(|_| self.started).and_then(Arbiter::poll_timeout);
        let early = self.early.iter().map(|(at, _)| *at + EARLY_MESSAGE_WAIT).min();
        let relay = self.relay.poll_timeout();
        [arbiter, early, relay].into_iter().flatten().min()
    }

    fn on_timeout(&mut self, now: Instant, out: &mut Outbox) {
        if self.relay.poll_timeout().is_some_and(|t| t <= now) {
            self.relay.handle_timeout(now);
        }
        self.exchange(now, out);
        self.release_early(now, out);
        if let Some(arbiter) = self.arbiter.as_mut().filter(|_| self.started)
            && arbiter.poll_timeout().is_some_and(|t| t <= now)
        {
            arbiter.handle_timeout(now);
            self.exchange(now, out);
        }
    }

    fn server_api(&self) -> Option<Arc<ServerApi>> {
        self.cfg.api.clone()
    }

    fn state_store(&self) -> Option<crate::store::RoomStoreClient> {
        self.durable.as_ref().map(|d| d.client.clone())
    }

    fn on_store_result(&mut self, tag: u64, result: crate::store::Reply, now: Instant, out: &mut Outbox) {
        let waiting = self.durable.as_mut().and_then(|d| d.acks.remove(&tag));
        match (waiting, result) {
            (Some((from, id)), Ok(())) => {
                self.relay.release_ack(&from, id);
            }
            (Some((from, id)), Err(e)) => {
                tracing::warn!(room = %self.cfg.room, %from, transfer_id = %id, error = %e, "checkpoint not stored durably; refused");
                self.relay.refuse_ack(&from, id, &e.to_string());
            }
            (None, Ok(())) => {}
            (None, Err(e)) => tracing::warn!(room = %self.cfg.room, error = %e, "room state not stored"),
        }
        self.exchange(now, out);
    }

    fn on_api_result(&mut self, done: ApiResult, now: Instant, out: &mut Outbox) {
        match (done.call, done.result) {
            (ApiCall::ListDispatch, result) => {
                let names = match result {
                    Ok(ApiReply::Dispatched(names)) => names,
                    Ok(reply) => {
                        tracing::warn!(?reply, "unexpected ListDispatch reply; assuming no dispatches");
                        Vec::new()
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not list the room's dispatches; assuming none");
                        Vec::new()
                    }
                };
                self.start(names, now, out);
            }
            (ApiCall::CreateDispatch { .. }, result) => {
                let ticket = DispatchTicket(done.tag);
                let event = match result {
                    Ok(ApiReply::DispatchCreated { dispatch_id }) => {
                        tracing::info!(%dispatch_id, "dispatch created");
                        Event::DispatchCreated { ticket, dispatch_id }
                    }
                    Ok(reply) => {
                        Event::DispatchFailed { ticket, error: format!("unexpected reply {reply:?}") }
                    }
                    Err(e) => Event::DispatchFailed { ticket, error: e.to_string() },
                };
                self.feed(event, now, out);
            }
            (ApiCall::JobStatus { identity }, Ok(ApiReply::JobStatus(status))) => {
                tracing::debug!(%identity, status = status.unwrap_or("no job"), "agent job status");
                if let Some(status) = status.filter(|s| crate::server_api::job_ended(s)) {
                    self.feed(Event::JobEnded { identity, status: status.to_owned() }, now, out);
                }
            }
            (call, Ok(_)) => tracing::debug!("{call}: done"),
            (call, Err(e)) => tracing::warn!(error = %e, "{call}: failed"),
        }
    }

    fn finished(&self) -> bool {
        self.finished
    }
}

/// What the metrics count of a relay event, if anything.
fn relay_stat(event: &RelayEvent) -> Option<Stat> {
    Some(match event {
        RelayEvent::CheckpointApplied { bytes, state_bytes, .. } => {
            Stat::CheckpointApplied { bytes: *bytes, state_bytes: *state_bytes }
        }
        RelayEvent::CheckpointRejected { .. } => Stat::CheckpointRejected,
        RelayEvent::Delivered { bytes_sent, bytes_resent, .. } => {
            Stat::BundleDelivered { bytes_sent: *bytes_sent, bytes_resent: *bytes_resent }
        }
        RelayEvent::Rejected { .. } => Stat::TransferFrameRejected,
        _ => return None,
    })
}

/// What the arbiter needs to know of a relay event, if anything.
fn arbiter_event(event: RelayEvent) -> Option<Event> {
    use RelayEvent as R;
    Some(match event {
        // The relay has logged these already.
        R::BundleReceived { from, transfer_id, size, .. } => {
            Event::BundleReceived { from, transfer_id, bytes: size }
        }
        R::Delivered { to, transfer_id, .. } => Event::BundleDelivered { to, transfer_id },
        // Both legs' progress moves the deadlines waiting on the bundle (the floor's
        // `stall_timeout`), keyed by the bundle's id whichever leg it is.
        R::UploadProgress { from, transfer_id, bytes } => {
            Event::TransferProgress { peer: from, transfer_id, bytes }
        }
        R::DeliveryProgress { to, transfer_id, bytes, .. } => {
            Event::TransferProgress { peer: to, transfer_id, bytes }
        }
        R::DeliveryFailed { to, transfer_id, error, .. } => {
            Event::TransferFailed { peer: to, transfer_id, reason: error.to_string() }
        }
        R::ReceiveFailed { from, transfer_id, error } => {
            Event::TransferFailed { peer: from, transfer_id, reason: error.to_string() }
        }
        R::Rejected { from, transfer_id, error } => {
            tracing::warn!(%from, ?transfer_id, %error, "transfer frame rejected");
            return None;
        }
        // The arbiter starts a delivery once the bundle is held (BundleReceived); checkpoints
        // are the relay's own (the recovery reads them through `recovery_bundle`).
        R::Receiving { .. } | R::CheckpointApplied { .. } | R::CheckpointRejected { .. } => return None,
        R::Expired { transfer_id } => {
            tracing::debug!(%transfer_id, "stored bundle expired");
            return None;
        }
    })
}

fn log_alert(alert: &Alert) {
    match alert {
        Alert::AgentNoShow { agent_name, attempts, last_error } => tracing::error!(
            agent = %agent_name,
            attempts,
            last_error = last_error.as_deref().unwrap_or("none"),
            "agent `{agent_name}` never joined the room after {attempts} dispatch attempts; is a worker registered under that agent name?"
        ),
        Alert::DispatchFailed { agent_name, attempt, error } => {
            tracing::warn!(agent = %agent_name, attempt, %error, "dispatch failed")
        }
        Alert::FloorVacant { identity } => {
            tracing::warn!(%identity, "a handoff failed and its source is gone; nobody holds the floor")
        }
        Alert::RecoveryFailed { agent, identity, reason } => tracing::error!(
            %agent,
            %identity,
            reason = reason.as_str(),
            "no replacement of crashed agent `{agent}` could take the call; the caller hears the filler fade, and the next agent of that name to join gets the call"
        ),
        Alert::IgnoredMessage { from, message_type, why } => {
            tracing::info!(%from, message = message_type, why, "control message ignored")
        }
    }
}

/// How the arbiter sees a room member; its audio is its voice: the first audio track not
/// named [`FILLER_TRACK_NAME`](crate::room::FILLER_TRACK_NAME).
fn participant(m: &Member) -> Participant {
    use proto::participant_info::Kind;
    let kind = match m.kind {
        Kind::Standard => ParticipantKind::Standard,
        Kind::Ingress => ParticipantKind::Ingress,
        Kind::Egress => ParticipantKind::Egress,
        Kind::Sip => ParticipantKind::Sip,
        Kind::Agent => ParticipantKind::Agent,
        _ => ParticipantKind::Other,
    };
    let audio = m
        .tracks
        .iter()
        .find(|t| t.kind == proto::TrackType::Audio && t.name != crate::room::FILLER_TRACK_NAME)
        .map(|t| AudioTrack { sid: t.sid.clone(), muted: t.muted });
    Participant {
        identity: m.identity.clone(),
        kind,
        agent_name: m.agent_name().map(str::to_string),
        dispatch_id: m.attributes.get("lk.agent.dispatch_id").cloned(),
        audio,
    }
}

/// Whether this change starts or stops an agent talking, as its `lk.agent.state` attribute
/// says. livekit-agents publishes its state (listening, thinking, speaking) there; baton
/// subscribes to no audio, so the server sends it no speaker updates and this attribute is how it
/// learns that an agent is talking. An attribute that disappears while `speaking` (the agent
/// cleared its attributes) ends the talking, or the floor would wait on it forever.
fn speaking_change(change: &Change) -> Option<(String, bool)> {
    let speaking = |m: &crate::room::Member| m.attributes.get(AGENT_STATE).is_some_and(|s| s == "speaking");
    match change {
        Change::Joined(m) => speaking(m).then(|| (m.identity.clone(), true)),
        Change::Updated { before, after } if speaking(before) != speaking(after) => {
            Some((after.identity.clone(), speaking(after)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::roster::announced as info;
    use serde_json::Value;
    use std::collections::BTreeSet;

    fn incoming(from: &str, topic: &str, payload: &[u8]) -> Incoming {
        Incoming {
            from: from.into(),
            from_sid: format!("PA_{from}"),
            topic: topic.into(),
            payload: payload.to_vec(),
        }
    }

    fn sent(out: &Outbox) -> Vec<(String, Value)> {
        out.data
            .iter()
            .filter(|(topic, _, _)| topic == protocol::TOPIC_CONTROL)
            .map(|(_, payload, to)| (to.join(","), serde_json::from_slice(payload).expect("json")))
            .collect()
    }

    fn coordinator_with_triage(now: Instant) -> Coordinator {
        let policy = Policy {
            agents: BTreeSet::from(["triage".to_string()]),
            starting_agent: Some("triage".into()),
            ..Policy::default()
        };
        Coordinator::new(
            CoordinatorConfig { room: "r".into(), policy, api: None, echo: false, trace_context: false },
            now,
        )
        .expect("policy")
    }

    #[test]
    fn agent_state_attribute_starts_and_stops_talking_even_when_removed() {
        let member = |state: Option<&str>| crate::room::Member {
            sid: "PA_a".into(),
            identity: "a".into(),
            name: String::new(),
            kind: proto::participant_info::Kind::Agent,
            state: proto::participant_info::State::Active,
            attributes: state.map(|s| (AGENT_STATE.to_string(), s.to_string())).into_iter().collect(),
            tracks: Vec::new(),
            version: 1,
        };
        let updated =
            |b: Option<&str>, a: Option<&str>| Change::Updated { before: member(b), after: member(a) };
        assert_eq!(speaking_change(&Change::Joined(member(Some("speaking")))), Some(("a".into(), true)));
        assert_eq!(speaking_change(&Change::Joined(member(Some("listening")))), None);
        assert_eq!(speaking_change(&updated(Some("listening"), Some("speaking"))), Some(("a".into(), true)));
        assert_eq!(speaking_change(&updated(Some("speaking"), Some("thinking"))), Some(("a".into(), false)));
        assert_eq!(speaking_change(&updated(Some("speaking"), None)), Some(("a".into(), false)), "removed");
        assert_eq!(speaking_change(&updated(None, Some("listening"))), None);
        assert_eq!(speaking_change(&updated(Some("speaking"), Some("speaking"))), None);
    }

    /// A source's own filler track (published first here, as an adapter that publishes it at
    /// the tool call may) is not its voice: baton mutes the voice, never the filler.
    #[test]
    fn the_voice_track_is_the_first_audio_track_not_named_baton_filler() {
        let track = |sid: &str, name: &str, kind| crate::room::roster::TrackState {
            sid: sid.into(),
            name: name.into(),
            kind,
            source: proto::TrackSource::Unknown,
            muted: false,
        };
        let mut m = crate::room::Member {
            sid: "PA_a".into(),
            identity: "a".into(),
            name: String::new(),
            kind: proto::participant_info::Kind::Agent,
            state: proto::participant_info::State::Active,
            attributes: Default::default(),
            tracks: vec![
                track("TR_v", "video", proto::TrackType::Video),
                track("TR_f", crate::room::FILLER_TRACK_NAME, proto::TrackType::Audio),
                track("TR_a", "roomio_audio", proto::TrackType::Audio),
            ],
            version: 1,
        };
        assert_eq!(participant(&m).audio.map(|a| a.sid).as_deref(), Some("TR_a"));
        m.tracks.truncate(2);
        assert_eq!(participant(&m).audio, None, "a filler alone is no voice");
    }

    /// The OPEN of a transfer of `size` bytes.
    fn open_frame(id: u128, size: u64) -> Vec<u8> {
        let open = baton_transfer::Open {
            payload_size: size,
            wire_size: size,
            chunk_size: 256,
            sha256: [0; 32],
            deflate: false,
            meta: "{}".into(),
        };
        baton_transfer::Frame::Open { id: baton_transfer::TransferId::new(id), open }
            .encode()
            .expect("encodes")
    }

    #[test]
    fn a_transfer_that_overtakes_its_senders_join_is_held_not_dropped() {
        let now = Instant::now();
        let mut c = Coordinator::minimal("r", false);
        let mut out = Outbox::default();
        let (roster, _) = Roster::new("PA_baton", &[]);
        c.on_connected(&roster, now, &mut out);
        c.on_data(&incoming("agent-1", baton_transfer::TOPIC, &open_frame(7, 300)), now, &mut out);
        assert_eq!(c.relay.receiving(), 0, "not yet: the sender is unknown");
        let (mut roster, _) = Roster::new("PA_baton", &[]);
        let agent = info("agent-1", proto::participant_info::Kind::Agent, Some("triage"));
        for change in roster.apply(&[agent]) {
            c.on_change(&change, &roster, now, &mut out);
        }
        assert_eq!(c.relay.receiving(), 1, "the held OPEN reached the relay once the sender joined");
    }

    #[test]
    fn transfer_frames_go_out_as_bulk_and_control_replies_as_control() {
        let now = Instant::now();
        let mut c = Coordinator::minimal("r", false);
        let mut out = Outbox::default();
        let caller = info("caller", proto::participant_info::Kind::Standard, None);
        let (roster, joins) = Roster::new("PA_baton", &[caller]);
        for change in &joins {
            c.on_change(change, &roster, now, &mut out);
        }
        c.on_connected(&roster, now, &mut out);
        // A caller may not send bundles: the relay answers with an ERROR frame.
        c.on_data(&incoming("caller", baton_transfer::TOPIC, &open_frame(9, 10)), now, &mut out);
        c.on_data(&incoming("caller", "baton.control", br#"{"v":1,"type":"ping","id":"p"}"#), now, &mut out);
        assert_eq!(out.bulk.len(), 1, "{out:?}");
        assert_eq!(out.bulk[0].0, baton_transfer::TOPIC);
        assert_eq!(out.data.len(), 1, "{out:?}");
        assert_eq!(out.data[0].0, protocol::TOPIC_CONTROL);
    }

    #[test]
    fn ping_waits_for_its_senders_announcement_and_is_answered_to_the_sender_only() {
        let now = Instant::now();
        let mut c = Coordinator::minimal("r", false);
        let mut out = Outbox::default();
        let (roster, _) = Roster::new("PA_baton", &[]);
        c.on_connected(&roster, now, &mut out);
        let ping = |id: &str| format!(r#"{{"v":1,"type":"ping","id":"{id}"}}"#).into_bytes();
        c.on_data(&incoming("alice", "baton.control", &ping("x")), now, &mut out);
        c.on_data(&incoming("ghost", "baton.control", &ping("g")), now, &mut out);
        assert!(sent(&out).is_empty(), "held until the senders are announced: {out:?}");
        let (mut roster, _) = Roster::new("PA_baton", &[]);
        let alice = info("alice", proto::participant_info::Kind::Standard, None);
        for change in roster.apply(&[alice]) {
            c.on_change(&change, &roster, now, &mut out);
        }
        let msgs = sent(&out);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert_eq!(msgs[0].0, "alice");
        assert_eq!(msgs[0].1["type"], "pong");
        assert_eq!(msgs[0].1["re"], "x");
        // `ghost` is never announced: after the hold its ping is dropped without an answer.
        let mut later = Outbox::default();
        c.on_timeout(now + EARLY_MESSAGE_WAIT, &mut later);
        assert!(sent(&later).is_empty(), "{later:?}");
    }

    #[test]
    fn a_version_error_is_answered_to_agents_only() {
        let now = Instant::now();
        let mut c = Coordinator::minimal("r", false);
        let mut out = Outbox::default();
        let caller = info("caller", proto::participant_info::Kind::Standard, None);
        let agent = info("agent-1", proto::participant_info::Kind::Agent, Some("triage"));
        let (roster, joins) = Roster::new("PA_baton", &[caller, agent]);
        for change in &joins {
            c.on_change(change, &roster, now, &mut out);
        }
        c.on_connected(&roster, now, &mut out);
        let v9 = br#"{"v":9,"type":"ping","id":"v9"}"#;
        c.on_data(&incoming("caller", "baton.control", v9), now, &mut out);
        c.on_data(&incoming("agent-1", "baton.control", v9), now, &mut out);
        let msgs = sent(&out);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert_eq!(msgs[0].0, "agent-1");
        assert_eq!(msgs[0].1["code"], "unsupported_version");
    }

    #[test]
    fn echo_only_when_enabled() {
        let now = Instant::now();
        let mut out = Outbox::default();
        Coordinator::minimal("r", false).on_data(&incoming("a", "baton.echo", b"abc"), now, &mut out);
        assert!(out.data.is_empty());
        Coordinator::minimal("r", true).on_data(&incoming("a", "baton.echo", b"abc"), now, &mut out);
        assert_eq!(out.data[0].1, b"abc");
    }

    fn coordinator_with_api(now: Instant) -> Coordinator {
        // Nothing listens on port 9; no call is made here, the results are handed in by hand.
        let api = ServerApi::new("ws://127.0.0.1:9", "k", "secret-secret-secret-secret-secret").expect("url");
        let policy = Policy::with_agents(["triage", "billing"]);
        let cfg = CoordinatorConfig {
            room: "r".into(),
            policy,
            api: Some(Arc::new(api)),
            echo: false,
            trace_context: false,
        };
        Coordinator::new(cfg, now).expect("policy")
    }

    #[test]
    fn server_api_calls_are_values_and_their_results_come_back_by_tag() {
        let now = Instant::now();
        let mut c = coordinator_with_api(now);
        let mut out = Outbox::default();
        c.on_connected(&Roster::default(), now, &mut out);
        assert_eq!(out.calls, vec![(0, ApiCall::ListDispatch)], "the arbiter waits for the dispatch list");
        // The room's dispatch list names nobody: baton dispatches the starting agent itself.
        let mut out = Outbox::default();
        let listed =
            ApiResult { tag: 0, call: ApiCall::ListDispatch, result: Ok(ApiReply::Dispatched(vec![])) };
        c.on_api_result(listed, now, &mut out);
        let (tag, call) = out.calls.first().cloned().expect("CreateDispatch asked for");
        assert!(
            matches!(&call, ApiCall::CreateDispatch { agent_name, .. } if agent_name == "triage"),
            "{call:?}"
        );
        // It fails: the arbiter hears it under the same ticket (it retries after a backoff).
        let mut out = Outbox::default();
        let error = crate::server_api::ApiError::Other { op: "CreateDispatch", detail: "503".into() };
        c.on_api_result(ApiResult { tag, call, result: Err(error) }, now, &mut out);
        assert!(out.calls.is_empty(), "no retry before the backoff: {:?}", out.calls);
        let retry_at = c.poll_timeout().expect("a retry is scheduled");
        let mut out = Outbox::default();
        c.on_timeout(retry_at, &mut out);
        assert!(
            matches!(out.calls.as_slice(), [(t, ApiCall::CreateDispatch { .. })] if *t != tag),
            "retried under a new ticket: {:?}",
            out.calls
        );
    }

    #[test]
    fn a_token_dispatched_starting_agent_is_not_dispatched_again() {
        let now = Instant::now();
        let mut c = coordinator_with_api(now);
        let mut out = Outbox::default();
        c.on_connected(&Roster::default(), now, &mut out);
        let listed = dispatch_list(&["triage"]);
        let mut out = Outbox::default();
        c.on_api_result(listed, now, &mut out);
        assert!(out.calls.is_empty(), "{:?}", out.calls);
    }

    #[test]
    fn hello_from_the_starting_agent_gets_the_floor() {
        use proto::participant_info::Kind;
        let now = Instant::now();
        let mut c = coordinator_with_triage(now);
        let (roster, _) = Roster::new(
            "PA_baton",
            &[info("caller", Kind::Standard, None), info("agent-1", Kind::Agent, Some("triage"))],
        );
        let mut out = Outbox::default();
        c.on_connected(&roster, now, &mut out);
        let hello = br#"{"v":1,"type":"hello","id":"a-1","agent_name":"triage"}"#;
        c.on_data(&incoming("agent-1", "baton.control", hello), now, &mut out);
        let msgs = sent(&out);
        let activate = msgs.iter().find(|(_, m)| m["type"] == "activate").expect("activate sent");
        assert_eq!(activate.0, "agent-1");
        assert_eq!(activate.1["v"], 1);
        assert_eq!(activate.1["cause"], "start");
        assert!(activate.1["id"].as_str().is_some_and(|s| !s.is_empty()));
    }

    /// The server's answer to ListDispatch naming `agents`.
    fn dispatch_list(agents: &[&str]) -> ApiResult {
        let names = agents.iter().map(|a| a.to_string()).collect();
        ApiResult { tag: 0, call: ApiCall::ListDispatch, result: Ok(ApiReply::Dispatched(names)) }
    }

    /// A caller, triage (`agent-1`) and billing (`agent-2`).
    fn caller_triage_billing() -> Vec<proto::ParticipantInfo> {
        use proto::participant_info::Kind;
        vec![
            info("caller", Kind::Standard, None),
            info("agent-1", Kind::Agent, Some("triage")),
            info("agent-2", Kind::Agent, Some("billing")),
        ]
    }

    fn stored_client() -> crate::store::RoomStoreClient {
        let (handle, _) = crate::store::StoreHandle::detached();
        crate::store::RoomStoreClient { handle, room: "r".into(), holder: "test".into(), token: 1 }
    }

    fn records(out: &Outbox) -> Vec<crate::store::RoomRecord> {
        out.store
            .iter()
            .filter_map(|(_, w)| match w {
                crate::store::Write::Record(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_returning_baton_gives_the_floor_to_the_stored_holder_not_the_starting_agent() {
        let now = Instant::now();
        let snapshot = crate::store::Snapshot {
            record: Some(crate::store::RoomRecord {
                floor: Some(crate::store::FloorRecord {
                    identity: "agent-2".into(),
                    agent: "billing".into(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut c = coordinator_with_api(now).with_store(stored_client(), snapshot);
        let (roster, joins) = Roster::new("PA_baton", &caller_triage_billing());
        let mut out = Outbox::default();
        for change in &joins {
            c.on_change(change, &roster, now, &mut out);
        }
        c.on_connected(&roster, now, &mut out);
        let listed = dispatch_list(&["triage"]);
        let mut out = Outbox::default();
        c.on_api_result(listed, now, &mut out);
        for (agent, id) in [("agent-1", "t-1"), ("agent-2", "b-1")] {
            let name = if agent == "agent-1" { "triage" } else { "billing" };
            let hello = format!(r#"{{"v":1,"type":"hello","id":"{id}","agent_name":"{name}"}}"#);
            c.on_data(&incoming(agent, "baton.control", hello.as_bytes()), now, &mut out);
        }
        let msgs = sent(&out);
        let activated: Vec<&str> =
            msgs.iter().filter(|(_, m)| m["type"] == "activate").map(|(to, _)| to.as_str()).collect();
        assert_eq!(activated, ["agent-2"], "{msgs:?}");
        assert!(
            msgs.iter().any(|(to, m)| to == "agent-1" && m["type"] == "deactivate"),
            "the config's starting agent stands by: {msgs:?}"
        );
        assert!(
            !out.calls.iter().any(|(_, c)| matches!(c, ApiCall::CreateDispatch { .. })),
            "{:?}",
            out.calls
        );
        // The record still names billing (unchanged, so nothing is rewritten).
        let floor = |r: &crate::store::RoomRecord| r.floor.clone().map(|f| (f.identity, f.agent));
        let billing = Some(("agent-2".to_string(), "billing".to_string()));
        assert!(records(&out).iter().all(|r| floor(r) == billing), "{:?}", records(&out));
        assert_eq!(c.durable.as_ref().map(|d| floor(&d.current)), Some(billing.clone()));

        // The store was unreachable while the room held its lease and came back (maybe empty):
        // the next exchange writes the record again although it did not change, once.
        let status = c.durable.as_ref().map(|d| d.client.handle.status().clone()).expect("durable");
        status.mark_lost([&"r".to_string()]);
        let hello = r#"{"v":1,"type":"hello","id":"b-2","agent_name":"billing"}"#;
        let mut out = Outbox::default();
        c.on_data(&incoming("agent-2", "baton.control", hello.as_bytes()), now, &mut out);
        assert_eq!(records(&out).iter().map(floor).collect::<Vec<_>>(), [billing], "{:?}", out.store);
        let mut out = Outbox::default();
        c.on_data(&incoming("agent-2", "baton.control", hello.as_bytes()), now, &mut out);
        assert!(records(&out).is_empty(), "written again once: {:?}", out.store);
    }

    #[test]
    fn a_stored_holder_that_left_does_not_get_the_floor_and_the_session_end_forgets_the_room() {
        use proto::participant_info::Kind;
        let now = Instant::now();
        let snapshot = crate::store::Snapshot {
            record: Some(crate::store::RoomRecord {
                floor: Some(crate::store::FloorRecord { identity: "gone".into(), agent: "billing".into() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut c = coordinator_with_api(now).with_store(stored_client(), snapshot);
        let (roster, joins) = Roster::new("PA_baton", &[info("caller", Kind::Standard, None)]);
        let mut out = Outbox::default();
        for change in &joins {
            c.on_change(change, &roster, now, &mut out);
        }
        c.on_connected(&roster, now, &mut out);
        let listed = dispatch_list(&[]);
        let mut out = Outbox::default();
        c.on_api_result(listed, now, &mut out);
        assert!(
            out.calls.iter().any(
                |(_, c)| matches!(c, ApiCall::CreateDispatch { agent_name, .. } if agent_name == "triage")
            ),
            "with the stored holder gone, the starting agent is dispatched: {:?}",
            out.calls
        );
        let mut out = Outbox::default();
        let (mut roster, _) = Roster::new("PA_baton", &[info("caller", Kind::Standard, None)]);
        let mut left = info("caller", Kind::Standard, None);
        left.state = proto::participant_info::State::Disconnected as i32;
        left.version = 2;
        for change in roster.apply(&[left]) {
            c.on_change(&change, &roster, now, &mut out);
        }
        assert!(c.finished(), "the caller left: the session is over");
        assert_eq!(
            out.store.last().map(|(_, w)| w.clone()),
            Some(crate::store::Write::Forget),
            "{:?}",
            out.store
        );
    }

    #[test]
    fn forged_control_from_the_caller_changes_nothing() {
        use proto::participant_info::Kind;
        let now = Instant::now();
        let mut c = coordinator_with_triage(now);
        let (roster, _) = Roster::new("PA_baton", &[info("caller", Kind::Standard, None)]);
        let mut out = Outbox::default();
        c.on_connected(&roster, now, &mut out);
        let before = out.data.len();
        for forged in [
            br#"{"v":1,"type":"hello","id":"f-1","agent_name":"triage"}"#.as_slice(),
            br#"{"v":1,"type":"handoff","id":"f-2","target":"triage","reason":"x"}"#.as_slice(),
        ] {
            c.on_data(&incoming("caller", "baton.control", forged), now, &mut out);
        }
        assert_eq!(out.data.len(), before, "the caller's forged messages must not be answered");
        assert!(out.filler.is_empty());
    }

    #[test]
    fn malformed_agent_message_is_ignored() {
        let now = Instant::now();
        let mut c = coordinator_with_triage(now);
        let mut out = Outbox::default();
        c.on_connected(&Roster::default(), now, &mut out);
        let before = out.data.len();
        c.on_data(
            &incoming("x", "baton.control", br#"{"v":1,"type":"handoff","id":"h","target":5}"#),
            now,
            &mut out,
        );
        assert_eq!(out.data.len(), before);
    }
    /// A warm handoff triage -> billing with no bundle, driven to its end; returns every control
    /// message sent and the finished handoff's trace ids.
    fn warm_handoff(trace_context: bool) -> (Vec<(String, Value)>, Option<TraceParent>) {
        let t0 = Instant::now();
        let policy = Policy::with_agents(["triage", "billing"]);
        let cfg = CoordinatorConfig { room: "r".into(), policy, api: None, echo: false, trace_context };
        let mut c = Coordinator::new(cfg, t0).expect("policy");
        let (roster, _) = Roster::new("PA_baton", &caller_triage_billing());
        let mut out = Outbox::default();
        c.on_connected(&roster, t0, &mut out);
        for (who, msg) in [
            ("agent-1", r#"{"v":1,"type":"hello","id":"a-1","agent_name":"triage"}"#),
            ("agent-2", r#"{"v":1,"type":"hello","id":"b-1","agent_name":"billing"}"#),
            (
                "agent-1",
                r#"{"v":1,"type":"handoff","id":"a-2","target":"billing","reason":"bill","quiet":true}"#,
            ),
        ] {
            c.on_data(&incoming(who, "baton.control", msg.as_bytes()), t0, &mut out);
        }
        let prepare = sent(&out).into_iter().find(|(_, m)| m["type"] == "prepare").expect("prepare");
        let ready = format!(
            r#"{{"v":1,"type":"ready","id":"b-2","handoff":"{}"}}"#,
            prepare.1["handoff"].as_str().unwrap_or("")
        );
        c.on_data(&incoming("agent-2", "baton.control", ready.as_bytes()), t0, &mut out);
        let mut finished = None;
        for _ in 0..200 {
            finished = out.events.iter().find_map(|e| match e {
                crate::observe::Event::HandoffFinished(_, trace) => Some(*trace),
                _ => None,
            });
            if finished.is_some() {
                break;
            }
            let Some(at) = c.poll_timeout() else { break };
            c.on_timeout(at, &mut out);
        }
        (sent(&out), finished.expect("the handoff finished"))
    }

    #[test]
    fn a_handoffs_messages_carry_its_trace_ids_and_its_span_gets_them() {
        let (msgs, trace) = warm_handoff(true);
        let trace = trace.expect("trace ids for the finished handoff").to_string();
        let shape = |t: &str| {
            t.len() == baton_floor::TRACEPARENT_LEN
                && t.starts_with("00-")
                && t.ends_with("-01")
                && t[3..35].chars().all(|c| c.is_ascii_hexdigit())
        };
        assert!(shape(&trace), "{trace}");
        let of = |kind: &str| {
            msgs.iter()
                .filter(|(_, m)| m["type"] == kind)
                .map(|(_, m)| m["traceparent"].clone())
                .collect::<Vec<_>>()
        };
        // Every message about the handoff, to either agent, names the same trace; the start
        // activate and the standby deactivate belong to no handoff and carry none.
        for kind in ["handoff_accepted", "prepare", "release"] {
            assert_eq!(of(kind), vec![Value::from(trace.clone())], "{kind}");
        }
        let activates = of("activate");
        assert_eq!(activates, vec![Value::Null, Value::from(trace.clone())], "start, then the handoff's");
        assert!(of("deactivate").contains(&Value::from(trace.clone())), "{:?}", of("deactivate"));
        assert!(of("deactivate").contains(&Value::Null), "billing's standby");
    }

    #[test]
    fn without_trace_export_no_message_carries_trace_ids() {
        let (msgs, trace) = warm_handoff(false);
        assert_eq!(trace, None);
        assert!(msgs.iter().all(|(_, m)| m.get("traceparent").is_none()), "{msgs:?}");
        assert!(msgs.iter().any(|(_, m)| m["type"] == "prepare"), "the handoff ran");
    }
}
