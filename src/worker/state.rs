//! The worker protocol as a state machine: decoded [`ServerMessage`]s, room events and the
//! clock go in; [`WorkerMessage`]s to send and rooms to start or stop come out. No sockets, no
//! tasks, no clock of its own, so every exchange (registration, availability, assignment,
//! termination, reconnection, liveness) is tested in virtual time.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use livekit_protocol as proto;
use proto::{server_message, worker_message};

/// The parts of the worker's configuration the protocol needs.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Name the worker registers under; only dispatches naming it reach this worker.
    pub agent_name: String,
    /// Reported to the server with the registration.
    pub version: String,
    /// Rooms held at once; availability requests beyond this are declined.
    pub max_rooms: usize,
    /// baton's participant identity in each room.
    pub identity: String,
    /// How often the worker reports its load while nothing changes.
    pub status_interval: Duration,
    /// How often the worker pings the server; also the unit of the liveness check.
    pub ping_interval: Duration,
    /// Silence from the server after which the websocket is considered dead.
    pub ping_timeout: Duration,
    /// How long the server has to answer the registration.
    pub register_timeout: Duration,
    /// How long a slot promised in an availability answer is held for the assignment.
    pub assignment_timeout: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            agent_name: "baton".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            max_rooms: 200,
            identity: "baton".into(),
            status_interval: Duration::from_secs(5),
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(25),
            register_timeout: Duration::from_secs(10),
            assignment_timeout: Duration::from_secs(10),
        }
    }
}

/// livekit-server's default `agents.target_load`. The server only offers jobs to a worker whose
/// reported load is below it (its job affinity is `target_load - load`), so a worker that
/// reported `rooms / max_rooms` would stop getting rooms at 70% of `max_rooms`, with the extra
/// dispatches dropped by the server ("no servers available"). baton's capacity is `max_rooms`, so
/// the load it reports reaches the target exactly when it is full.
pub const SERVER_TARGET_LOAD: f32 = 0.7;

/// A room the worker was assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStart {
    pub job_id: String,
    pub dispatch_id: String,
    pub room: String,
    /// Server URL from the assignment; `None` means the worker's own URL.
    pub url: Option<String>,
    pub token: String,
    /// Dispatch metadata, passed on to the room's logic untouched.
    pub metadata: String,
}

/// What the IO shell must do.
// Actions live for one event's handling and come a few at a time; boxing the message would
// only add an allocation per send.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this message on the websocket.
    Send(proto::WorkerMessage),
    /// Join a room in its own task.
    SpawnRoom(JobStart),
    /// Ask a room task to leave (its shutdown watch); it reports back with
    /// [`WorkerState::on_room_ended`].
    StopRoom { job_id: String },
    /// Close the websocket and connect again (with backoff): the connection is not usable.
    Reconnect { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Conn {
    Disconnected,
    Registering { since: Instant },
    Registered { worker_id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobPhase {
    /// The room task is joining.
    Starting,
    /// baton is in the room.
    Running,
    /// The server or the operator asked the room to end; waiting for the task to finish.
    Stopping,
}

#[derive(Debug, Clone)]
struct Job {
    room: String,
    phase: JobPhase,
}

/// The worker's protocol state. One per process, owned by the worker task.
#[derive(Debug)]
pub struct WorkerState {
    cfg: StateConfig,
    conn: Conn,
    jobs: BTreeMap<String, Job>,
    /// Slots promised in availability answers, by job id, with the promise time.
    reserved: HashMap<String, Instant>,
    draining: bool,
    last_heard: Option<Instant>,
    next_ping: Option<Instant>,
    next_status: Option<Instant>,
}

impl WorkerState {
    pub fn new(cfg: StateConfig) -> Self {
        WorkerState {
            cfg,
            conn: Conn::Disconnected,
            jobs: BTreeMap::new(),
            reserved: HashMap::new(),
            draining: false,
            last_heard: None,
            next_ping: None,
            next_status: None,
        }
    }

    /// The server's id for this worker while registered.
    pub fn worker_id(&self) -> Option<&str> {
        match &self.conn {
            Conn::Registered { worker_id } => Some(worker_id),
            _ => None,
        }
    }

    /// Rooms currently held (joining, running or leaving).
    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    /// True once [`WorkerState::drain`] was called and every room has ended.
    pub fn drained(&self) -> bool {
        self.draining && self.jobs.is_empty()
    }

    /// The websocket is open: register.
    pub fn on_connected(&mut self, now: Instant) -> Vec<Action> {
        self.conn = Conn::Registering { since: now };
        self.last_heard = Some(now);
        self.next_ping = None;
        self.next_status = None;
        vec![Action::Send(msg(worker_message::Message::Register(proto::RegisterWorkerRequest {
            r#type: proto::JobType::JtRoom as i32,
            agent_name: self.cfg.agent_name.clone(),
            version: self.cfg.version.clone(),
            ping_interval: u32::try_from(self.cfg.ping_interval.as_secs()).unwrap_or(u32::MAX),
            // Subscribing would make the server give baton a second peer connection; baton
            // never listens to anyone, so it registers publish-only and stays single-PC.
            allowed_permissions: Some(proto::ParticipantPermission {
                can_subscribe: false,
                can_publish: true,
                can_publish_data: true,
                can_update_metadata: true,
                ..Default::default()
            }),
            ..Default::default()
        })))]
    }

    /// The websocket is gone. Rooms keep running; promises made on the old connection are void
    /// because the server that asked will not send their assignments here.
    pub fn on_disconnected(&mut self) {
        self.conn = Conn::Disconnected;
        self.reserved.clear();
        self.last_heard = None;
        self.next_ping = None;
        self.next_status = None;
    }

    /// A decoded message from the server.
    pub fn on_server_message(&mut self, m: proto::ServerMessage, now: Instant) -> Vec<Action> {
        self.last_heard = Some(now);
        let Some(m) = m.message else {
            return Vec::new();
        };
        match m {
            server_message::Message::Register(r) => self.on_registered(r, now),
            server_message::Message::Availability(req) => self.on_availability(req, now),
            server_message::Message::Assignment(a) => self.on_assignment(a, now),
            server_message::Message::Termination(t) => self.on_termination(t),
            server_message::Message::Pong(_) => Vec::new(),
            server_message::Message::GoAway(_) => {
                vec![Action::Reconnect { reason: "the server is draining this connection".into() }]
            }
        }
    }

    /// baton is in the room of `job_id`.
    pub fn on_room_joined(&mut self, job_id: &str) -> Vec<Action> {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return Vec::new();
        };
        if job.phase == JobPhase::Starting {
            job.phase = JobPhase::Running;
        }
        self.send_if_registered(job_status(job_id, proto::JobStatus::JsRunning, ""))
    }

    /// The room task of `job_id` finished; `error` is why, if it failed. Frees the slot.
    pub fn on_room_ended(&mut self, job_id: &str, error: Option<&str>) -> Vec<Action> {
        if self.jobs.remove(job_id).is_none() {
            return Vec::new();
        }
        let mut out = match error {
            None => self.send_if_registered(job_status(job_id, proto::JobStatus::JsSuccess, "")),
            Some(e) => self.send_if_registered(job_status(job_id, proto::JobStatus::JsFailed, e)),
        };
        out.extend(self.status_now());
        out
    }

    /// Stop taking jobs and end every room (for a clean exit).
    pub fn drain(&mut self) -> Vec<Action> {
        self.draining = true;
        let mut out = self.status_now();
        for (id, job) in &mut self.jobs {
            if job.phase != JobPhase::Stopping {
                job.phase = JobPhase::Stopping;
                out.push(Action::StopRoom { job_id: id.clone() });
            }
        }
        out
    }

    /// When [`WorkerState::on_tick`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        match self.conn {
            Conn::Disconnected => return None,
            Conn::Registering { since } => consider(Some(since + self.cfg.register_timeout)),
            Conn::Registered { .. } => {
                consider(self.next_ping);
                consider(self.next_status);
                consider(self.last_heard.map(|t| t + self.cfg.ping_timeout));
            }
        }
        for since in self.reserved.values() {
            consider(Some(*since + self.cfg.assignment_timeout));
        }
        at
    }

    /// Timers: registration deadline, pings, the liveness check, periodic load reports and
    /// expired availability promises.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        let timeout = self.cfg.assignment_timeout;
        self.reserved.retain(|_, since| now < *since + timeout);
        match self.conn {
            Conn::Disconnected => Vec::new(),
            Conn::Registering { since } => {
                if now >= since + self.cfg.register_timeout {
                    vec![Action::Reconnect {
                        reason: format!("no registration answer within {:?}", self.cfg.register_timeout),
                    }]
                } else {
                    Vec::new()
                }
            }
            Conn::Registered { .. } => {
                if let Some(heard) = self.last_heard
                    && now >= heard + self.cfg.ping_timeout
                {
                    return vec![Action::Reconnect {
                        reason: format!("nothing from the server for {:?}", now - heard),
                    }];
                }
                let mut out = Vec::new();
                if self.next_ping.is_some_and(|t| now >= t) {
                    self.next_ping = Some(now + self.cfg.ping_interval);
                    out.push(Action::Send(msg(worker_message::Message::Ping(proto::WorkerPing {
                        timestamp: unix_millis(),
                    }))));
                }
                if self.next_status.is_some_and(|t| now >= t) {
                    out.extend(self.status_now());
                    self.next_status = Some(now + self.cfg.status_interval);
                }
                out
            }
        }
    }

    fn on_registered(&mut self, r: proto::RegisterWorkerResponse, now: Instant) -> Vec<Action> {
        self.conn = Conn::Registered { worker_id: r.worker_id };
        self.next_ping = Some(now + self.cfg.ping_interval);
        self.next_status = Some(now + self.cfg.status_interval);
        // After a re-registration the server knows nothing of the rooms still held; tell it
        // the load right away so it does not overbook this worker.
        self.status_now()
    }

    fn has_room(&self) -> bool {
        !self.draining && self.jobs.len() + self.reserved.len() < self.cfg.max_rooms
    }

    fn on_availability(&mut self, req: proto::AvailabilityRequest, now: Instant) -> Vec<Action> {
        let Some(job) = req.job else {
            return Vec::new();
        };
        let room_job = job.r#type == proto::JobType::JtRoom as i32;
        // A job already held (a re-sent request after a reconnect) must not get a second baton.
        let available = room_job
            && !self.jobs.contains_key(&job.id)
            && (self.reserved.contains_key(&job.id) || self.has_room());
        if available {
            self.reserved.insert(job.id.clone(), now);
        }
        let resp = proto::AvailabilityResponse {
            job_id: job.id,
            available,
            participant_identity: if available { self.cfg.identity.clone() } else { String::new() },
            participant_name: if available { self.cfg.identity.clone() } else { String::new() },
            participant_attributes: if available {
                HashMap::from([(
                    crate::token::ROLE_ATTRIBUTE.to_string(),
                    crate::token::ROLE_COORDINATOR.to_string(),
                )])
            } else {
                HashMap::new()
            },
            ..Default::default()
        };
        vec![Action::Send(msg(worker_message::Message::Availability(resp)))]
    }

    fn on_assignment(&mut self, a: proto::JobAssignment, _now: Instant) -> Vec<Action> {
        let Some(job) = a.job else {
            return Vec::new();
        };
        let promised = self.reserved.remove(&job.id).is_some();
        if self.jobs.contains_key(&job.id) {
            return Vec::new();
        }
        // An assignment without a live promise (it expired, or it was made on an older
        // connection) is still honoured if there is room: declining now would strand the room.
        if !promised && !self.has_room() {
            return self.send_if_registered(job_status(
                &job.id,
                proto::JobStatus::JsFailed,
                "worker is full or draining",
            ));
        }
        let room = job.room.as_ref().map(|r| r.name.clone()).unwrap_or_default();
        self.jobs.insert(job.id.clone(), Job { room: room.clone(), phase: JobPhase::Starting });
        let mut out = vec![Action::SpawnRoom(JobStart {
            job_id: job.id,
            dispatch_id: job.dispatch_id,
            room,
            url: a.url.filter(|u| !u.is_empty()),
            token: a.token,
            metadata: job.metadata,
        })];
        out.extend(self.status_now());
        out
    }

    fn on_termination(&mut self, t: proto::JobTermination) -> Vec<Action> {
        match self.jobs.get_mut(&t.job_id) {
            Some(job) if job.phase != JobPhase::Stopping => {
                job.phase = JobPhase::Stopping;
                vec![Action::StopRoom { job_id: t.job_id }]
            }
            _ => Vec::new(),
        }
    }

    /// The room name of a held job, for logs.
    pub fn room_of(&self, job_id: &str) -> Option<&str> {
        self.jobs.get(job_id).map(|j| j.room.as_str())
    }

    fn status_now(&self) -> Vec<Action> {
        let count = self.jobs.len();
        let full = self.draining || count >= self.cfg.max_rooms;
        let load = if full || self.cfg.max_rooms == 0 {
            1.0
        } else {
            SERVER_TARGET_LOAD * count as f32 / self.cfg.max_rooms as f32
        };
        self.send_if_registered(msg(worker_message::Message::UpdateWorker(proto::UpdateWorkerStatus {
            status: Some(
                if full { proto::WorkerStatus::WsFull } else { proto::WorkerStatus::WsAvailable } as i32
            ),
            load,
            job_count: u32::try_from(count).unwrap_or(u32::MAX),
            ..Default::default()
        })))
    }

    fn send_if_registered(&self, m: proto::WorkerMessage) -> Vec<Action> {
        // Status for a server we are not registered with would be rejected or misread; the next
        // registration reports the full state instead.
        if matches!(self.conn, Conn::Registered { .. }) { vec![Action::Send(m)] } else { Vec::new() }
    }
}

fn msg(m: worker_message::Message) -> proto::WorkerMessage {
    proto::WorkerMessage { message: Some(m) }
}

fn job_status(job_id: &str, status: proto::JobStatus, error: &str) -> proto::WorkerMessage {
    msg(worker_message::Message::UpdateJob(proto::UpdateJobStatus {
        job_id: job_id.to_string(),
        status: status as i32,
        error: error.to_string(),
    }))
}

fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Reconnection delays: doubling from `initial` up to `max`, each drawn uniformly from the upper
/// half of the current step ("equal jitter"), so a fleet of workers that lost the same server
/// does not come back in lockstep, yet no worker waits much less than planned.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, attempt: 0 }
    }

    /// The wait before the next attempt; `unit` is a random number in `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let step = self.initial.saturating_mul(1u32 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// A connection succeeded: the next failure starts from `initial` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_rooms: usize) -> StateConfig {
        StateConfig { max_rooms, ..StateConfig::default() }
    }

    fn server(m: server_message::Message) -> proto::ServerMessage {
        proto::ServerMessage { message: Some(m) }
    }

    fn registered(max_rooms: usize, now: Instant) -> WorkerState {
        let mut s = WorkerState::new(cfg(max_rooms));
        s.on_connected(now);
        s.on_server_message(
            server(server_message::Message::Register(proto::RegisterWorkerResponse {
                worker_id: "AW_1".into(),
                ..Default::default()
            })),
            now,
        );
        s
    }

    fn job(id: &str, room: &str) -> proto::Job {
        proto::Job {
            id: id.into(),
            dispatch_id: format!("AD_{id}"),
            r#type: proto::JobType::JtRoom as i32,
            room: Some(proto::Room { name: room.into(), ..Default::default() }),
            agent_name: "baton".into(),
            ..Default::default()
        }
    }

    fn ask(s: &mut WorkerState, id: &str, now: Instant) -> proto::AvailabilityResponse {
        let out = s.on_server_message(
            server(server_message::Message::Availability(proto::AvailabilityRequest {
                job: Some(job(id, &format!("room-{id}"))),
                resuming: false,
            })),
            now,
        );
        match out.as_slice() {
            [
                Action::Send(proto::WorkerMessage {
                    message: Some(worker_message::Message::Availability(r)),
                }),
            ] => r.clone(),
            other => panic!("expected one availability answer, got {other:?}"),
        }
    }

    fn assign(s: &mut WorkerState, id: &str, url: Option<&str>, now: Instant) -> Vec<Action> {
        s.on_server_message(
            server(server_message::Message::Assignment(proto::JobAssignment {
                job: Some(job(id, &format!("room-{id}"))),
                url: url.map(str::to_string),
                token: format!("tok-{id}"),
            })),
            now,
        )
    }

    fn sent(out: &[Action]) -> Vec<&worker_message::Message> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send(m) => m.message.as_ref(),
                _ => None,
            })
            .collect()
    }

    fn last_status(out: &[Action]) -> Option<proto::UpdateWorkerStatus> {
        sent(out).into_iter().rev().find_map(|m| match m {
            worker_message::Message::UpdateWorker(u) => Some(*u),
            _ => None,
        })
    }

    #[test]
    fn registers_as_a_publish_only_room_worker() {
        let mut s = WorkerState::new(StateConfig { agent_name: "coord".into(), ..cfg(3) });
        let out = s.on_connected(Instant::now());
        let [Action::Send(proto::WorkerMessage { message: Some(worker_message::Message::Register(r)) })] =
            out.as_slice()
        else {
            panic!("expected a register message, got {out:?}");
        };
        assert_eq!(r.agent_name, "coord");
        assert_eq!(r.r#type, proto::JobType::JtRoom as i32);
        let p = r.allowed_permissions.as_ref().expect("permissions");
        assert!(p.can_publish && p.can_publish_data && !p.can_subscribe);
        assert_eq!(s.worker_id(), None);
    }

    #[test]
    fn registration_reports_load_and_sets_worker_id() {
        let now = Instant::now();
        let mut s = WorkerState::new(cfg(4));
        s.on_connected(now);
        let out = s.on_server_message(
            server(server_message::Message::Register(proto::RegisterWorkerResponse {
                worker_id: "AW_x".into(),
                ..Default::default()
            })),
            now,
        );
        assert_eq!(s.worker_id(), Some("AW_x"));
        let st = last_status(&out).expect("status after register");
        assert_eq!(st.job_count, 0);
        assert_eq!(st.status, Some(proto::WorkerStatus::WsAvailable as i32));
    }

    #[test]
    fn availability_assignment_spawns_room_with_identity_and_role() {
        let now = Instant::now();
        let mut s = registered(2, now);
        let r = ask(&mut s, "J1", now);
        assert!(r.available);
        assert_eq!(r.job_id, "J1");
        assert_eq!(r.participant_identity, "baton");
        assert_eq!(r.participant_attributes.get("baton.role").map(String::as_str), Some("coordinator"));
        let out = assign(&mut s, "J1", Some(""), now);
        assert_eq!(
            out[0],
            Action::SpawnRoom(JobStart {
                job_id: "J1".into(),
                dispatch_id: "AD_J1".into(),
                room: "room-J1".into(),
                url: None,
                token: "tok-J1".into(),
                metadata: String::new(),
            })
        );
        assert_eq!(last_status(&out).map(|u| u.job_count), Some(1));
        assert_eq!(s.room_of("J1"), Some("room-J1"));
        let out = assign(&mut s, "J2", Some("wss://elsewhere"), now);
        let Action::SpawnRoom(start) = &out[0] else { panic!("{out:?}") };
        assert_eq!(start.url.as_deref(), Some("wss://elsewhere"));
    }

    #[test]
    fn full_worker_declines_and_reports_full() {
        let now = Instant::now();
        let mut s = registered(2, now);
        assert!(ask(&mut s, "J1", now).available);
        // A promised slot counts even before its assignment arrives.
        assert!(ask(&mut s, "J2", now).available);
        let declined = ask(&mut s, "J3", now);
        assert!(!declined.available);
        assert!(declined.participant_identity.is_empty());
        assign(&mut s, "J1", None, now);
        let out = assign(&mut s, "J2", None, now);
        let st = last_status(&out).expect("status");
        assert_eq!(st.status, Some(proto::WorkerStatus::WsFull as i32));
        assert!((st.load - 1.0).abs() < f32::EPSILON);
        // The slot frees when a room ends.
        let out = s.on_room_ended("J1", None);
        assert!(sent(&out).iter().any(|m| matches!(m,
            worker_message::Message::UpdateJob(u) if u.job_id == "J1" && u.status == proto::JobStatus::JsSuccess as i32)));
        assert_eq!(last_status(&out).map(|u| u.status), Some(Some(proto::WorkerStatus::WsAvailable as i32)));
        assert!(ask(&mut s, "J4", now).available);
    }

    #[test]
    fn load_stays_below_the_servers_target_until_full() {
        let now = Instant::now();
        let mut s = registered(200, now);
        let mut last = None;
        for i in 0..199 {
            let id = format!("J{i}");
            assert!(ask(&mut s, &id, now).available);
            last = last_status(&assign(&mut s, &id, None, now)).or(last);
        }
        let st = last.expect("status");
        assert_eq!(st.status, Some(proto::WorkerStatus::WsAvailable as i32));
        assert!(st.load < SERVER_TARGET_LOAD, "load {} at 199 of 200 rooms", st.load);
        assert!(ask(&mut s, "J199", now).available);
        let st = last_status(&assign(&mut s, "J199", None, now)).expect("status");
        assert_eq!(st.status, Some(proto::WorkerStatus::WsFull as i32));
        assert!(st.load >= SERVER_TARGET_LOAD);
    }

    #[test]
    fn unclaimed_promises_expire() {
        let t0 = Instant::now();
        let mut s = registered(1, t0);
        assert!(ask(&mut s, "J1", t0).available);
        assert!(!ask(&mut s, "J2", t0).available);
        let later = t0 + s.cfg.assignment_timeout + Duration::from_millis(1);
        assert!(s.poll_timeout().is_some_and(|t| t <= later));
        s.on_tick(later);
        assert!(ask(&mut s, "J2", later).available);
    }

    #[test]
    fn duplicate_job_is_declined_and_not_spawned_twice() {
        let now = Instant::now();
        let mut s = registered(5, now);
        ask(&mut s, "J1", now);
        assign(&mut s, "J1", None, now);
        assert!(!ask(&mut s, "J1", now).available);
        assert!(assign(&mut s, "J1", None, now).is_empty());
        assert_eq!(s.job_count(), 1);
    }

    #[test]
    fn joined_reports_running_and_failure_reports_failed() {
        let now = Instant::now();
        let mut s = registered(5, now);
        assign(&mut s, "J1", None, now);
        let out = s.on_room_joined("J1");
        assert!(matches!(sent(&out).as_slice(),
            [worker_message::Message::UpdateJob(u)] if u.status == proto::JobStatus::JsRunning as i32));
        let out = s.on_room_ended("J1", Some("could not join: bad token"));
        assert!(sent(&out).iter().any(|m| matches!(m,
            worker_message::Message::UpdateJob(u) if u.status == proto::JobStatus::JsFailed as i32 && u.error.contains("bad token"))));
        assert_eq!(s.job_count(), 0);
        // A second end report for the same job is ignored.
        assert!(s.on_room_ended("J1", None).is_empty());
    }

    #[test]
    fn termination_stops_the_room_once() {
        let now = Instant::now();
        let mut s = registered(5, now);
        assign(&mut s, "J1", None, now);
        let term =
            || server(server_message::Message::Termination(proto::JobTermination { job_id: "J1".into() }));
        assert_eq!(s.on_server_message(term(), now), vec![Action::StopRoom { job_id: "J1".into() }]);
        assert!(s.on_server_message(term(), now).is_empty());
        // Unknown jobs are ignored.
        let other =
            server(server_message::Message::Termination(proto::JobTermination { job_id: "nope".into() }));
        assert!(s.on_server_message(other, now).is_empty());
        // The slot is held until the task really ends.
        assert_eq!(s.job_count(), 1);
        s.on_room_ended("J1", None);
        assert_eq!(s.job_count(), 0);
    }

    #[test]
    fn pings_status_and_liveness_in_virtual_time() {
        let t0 = Instant::now();
        let mut s = registered(5, t0);
        // Periodic status arrives with its interval (5 s), before the first ping (10 s).
        let out = s.on_tick(t0 + s.cfg.status_interval);
        assert!(last_status(&out).is_some());
        assert!(!sent(&out).iter().any(|m| matches!(m, worker_message::Message::Ping(_))));
        let ping_at = t0 + s.cfg.ping_interval;
        assert!(s.poll_timeout().is_some_and(|t| t <= ping_at));
        let out = s.on_tick(ping_at);
        assert!(sent(&out).iter().any(|m| matches!(m, worker_message::Message::Ping(_))));
        // A pong keeps the connection alive...
        let pong_at = ping_at + Duration::from_millis(5);
        s.on_server_message(
            server(server_message::Message::Pong(proto::WorkerPong { last_timestamp: 1, timestamp: 2 })),
            pong_at,
        );
        let quiet_until = pong_at + s.cfg.ping_timeout;
        assert!(
            !s.on_tick(quiet_until - Duration::from_millis(1))
                .iter()
                .any(|a| matches!(a, Action::Reconnect { .. }))
        );
        // ...and silence past the timeout asks for a new connection.
        assert!(s.on_tick(quiet_until).iter().any(|a| matches!(a, Action::Reconnect { .. })));
    }

    #[test]
    fn registration_must_be_answered() {
        let t0 = Instant::now();
        let mut s = WorkerState::new(cfg(1));
        s.on_connected(t0);
        assert_eq!(s.poll_timeout(), Some(t0 + s.cfg.register_timeout));
        assert!(s.on_tick(t0 + Duration::from_secs(1)).is_empty());
        assert!(matches!(s.on_tick(t0 + s.cfg.register_timeout).as_slice(), [Action::Reconnect { .. }]));
    }

    #[test]
    fn rooms_survive_a_reconnect_and_are_reported_on_reregistration() {
        let t0 = Instant::now();
        let mut s = registered(3, t0);
        assign(&mut s, "J1", None, t0);
        ask(&mut s, "J2", t0);
        s.on_disconnected();
        assert_eq!(s.poll_timeout(), None);
        // While disconnected nothing is sent, but the bookkeeping goes on.
        assert!(s.on_room_joined("J1").is_empty());
        assert_eq!(s.worker_id(), None);
        let t1 = t0 + Duration::from_secs(3);
        s.on_connected(t1);
        let out = s.on_server_message(
            server(server_message::Message::Register(proto::RegisterWorkerResponse {
                worker_id: "AW_2".into(),
                ..Default::default()
            })),
            t1,
        );
        assert_eq!(last_status(&out).map(|u| u.job_count), Some(1));
        // The promise for J2 died with the old connection: two slots are free again.
        assert!(ask(&mut s, "J3", t1).available);
        assert!(ask(&mut s, "J4", t1).available);
        assert!(!ask(&mut s, "J5", t1).available);
    }

    #[test]
    fn drain_stops_everything_and_declines() {
        let now = Instant::now();
        let mut s = registered(3, now);
        assign(&mut s, "J1", None, now);
        assign(&mut s, "J2", None, now);
        let out = s.drain();
        assert_eq!(last_status(&out).map(|u| u.status), Some(Some(proto::WorkerStatus::WsFull as i32)));
        let stops: Vec<_> = out.iter().filter(|a| matches!(a, Action::StopRoom { .. })).collect();
        assert_eq!(stops.len(), 2);
        assert!(!ask(&mut s, "J3", now).available);
        assert!(!s.drained());
        s.on_room_ended("J1", None);
        s.on_room_ended("J2", None);
        assert!(s.drained());
    }

    #[test]
    fn participant_jobs_are_declined() {
        let now = Instant::now();
        let mut s = registered(3, now);
        let mut j = job("J1", "r");
        j.r#type = proto::JobType::JtPublisher as i32;
        let out = s.on_server_message(
            server(server_message::Message::Availability(proto::AvailabilityRequest {
                job: Some(j),
                resuming: false,
            })),
            now,
        );
        assert!(matches!(sent(&out).as_slice(), [worker_message::Message::Availability(r)] if !r.available));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let d: Vec<Duration> = (0..6).map(|_| b.next_delay(0.0)).collect();
        assert_eq!(d[0], Duration::from_millis(250));
        assert_eq!(d[1], Duration::from_millis(500));
        assert_eq!(d[3], Duration::from_secs(2));
        assert_eq!(d[5], Duration::from_secs(2));
        let top = b.next_delay(0.999_999);
        assert!(top <= Duration::from_secs(4) && top > Duration::from_millis(3990));
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(500));
    }
}
