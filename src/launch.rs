//! `baton ensure`: makes sure a room has its coordinator, whichever came first, the room or the
//! caller.
//!
//! LiveKit applies a token's `RoomConfiguration.agents` only when that join creates the room, so a
//! room made beforehand (`CreateRoom`, or another participant) gets no baton from the caller's
//! token, and nobody is told. This module checks the room through the server API and dispatches
//! baton when it has neither a coordinator participant nor a dispatch that is still under way.
//!
//! [`assess`] is the decision, a pure function of what the server reported (time passed in);
//! [`ensure`] is the thin shell that asks the server, applies the decision and waits.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use livekit_api::services::room::{CreateRoomOptions, RoomClient};
use livekit_protocol as proto;
use lk_baton::server_api::{ServerApi, http_url};
use lk_baton::token::{ROLE_ATTRIBUTE, ROLE_COORDINATOR};

/// A dispatch of baton's agent name with no job after this long was dropped by the server (it
/// drops a dispatch, without retrying, when no worker with that name is registered), so it no
/// longer counts. A worker normally gets the job within a second of the dispatch.
pub const UNASSIGNED_DISPATCH_STALE: Duration = Duration::from_secs(30);

/// How often [`ensure`] looks for baton's participant while it waits.
const POLL: Duration = Duration::from_millis(250);

/// What the room holds of its coordinator, as [`assess`] judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A participant of kind agent whose attribute `baton.role` is `coordinator` (both from the
    /// token the server accepted, `src/token.rs`) is in the room.
    Present { identity: String },
    /// A dispatch of baton's agent name is under way: not assigned yet (and younger than
    /// [`UNASSIGNED_DISPATCH_STALE`]), or with a job pending or running.
    Dispatched { dispatch_id: String },
    /// Neither: baton must be dispatched.
    Missing,
}

/// Judges a room from its participants and dispatches (`ListParticipants`, `ListDispatch`).
///
/// `now_unix_ns` is the current time in nanoseconds since the Unix epoch, the clock of the
/// dispatches' `created_at` (the server's; a skew between the two clocks only moves the
/// [`UNASSIGNED_DISPATCH_STALE`] limit). A dispatch whose jobs have all ended (baton left the
/// room) or that was deleted does not count.
pub fn assess(
    participants: &[proto::ParticipantInfo],
    dispatches: &[proto::AgentDispatch],
    agent_name: &str,
    now_unix_ns: i64,
) -> Finding {
    let coordinator = |p: &&proto::ParticipantInfo| {
        p.kind == proto::participant_info::Kind::Agent as i32
            && p.attributes.get(ROLE_ATTRIBUTE).is_some_and(|r| r == ROLE_COORDINATOR)
    };
    if let Some(p) = participants.iter().find(coordinator) {
        return Finding::Present { identity: p.identity.clone() };
    }
    let stale_ns = i64::try_from(UNASSIGNED_DISPATCH_STALE.as_nanos()).unwrap_or(i64::MAX);
    let under_way = |d: &&proto::AgentDispatch| {
        let Some(state) = &d.state else {
            // No state reported: nothing says it is over.
            return true;
        };
        if state.deleted_at != 0 {
            return false;
        }
        if state.jobs.is_empty() {
            return now_unix_ns.saturating_sub(state.created_at) < stale_ns;
        }
        state.jobs.iter().any(|job| {
            job.state.as_ref().is_none_or(|s| {
                s.status == proto::JobStatus::JsPending as i32
                    || s.status == proto::JobStatus::JsRunning as i32
            })
        })
    };
    match dispatches.iter().filter(|d| d.agent_name == agent_name).find(under_way) {
        Some(d) => Finding::Dispatched { dispatch_id: d.id.clone() },
        None => Finding::Missing,
    }
}

/// How [`ensure`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// baton is in the room (it was already, or arrived within the wait).
    InRoom { identity: String },
    /// baton is dispatched (by this run or an earlier one) but was not in the room when the
    /// wait ended (at once with a zero wait).
    NotYetInRoom { dispatch_id: String },
}

/// Makes sure `room` has its coordinator: creates the room if it does not exist, dispatches
/// `agent_name` unless a coordinator is in the room or a dispatch of it is under way, then waits
/// up to `wait` for baton's participant. Each step is reported through `say`, one line each.
///
/// Errors: the server API's (unreachable, wrong key or secret, refused), with what to check.
/// Server calls: ListRooms, CreateRoom, ListParticipants, ListDispatch, CreateDispatch.
pub async fn ensure(
    url: &str,
    api_key: &str,
    api_secret: &str,
    room: &str,
    agent_name: &str,
    wait: Duration,
    mut say: impl FnMut(&str),
) -> anyhow::Result<Outcome> {
    let api = ServerApi::new(url, api_key, api_secret)?;
    // ServerApi has no room calls; RoomClient is livekit-api's own, on the same URL.
    let rooms = RoomClient::with_api_key(&http_url(url)?, api_key, api_secret);
    let hint = "check LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET";
    let existing = rooms
        .list_rooms(vec![room.to_string()])
        .await
        .map_err(|e| anyhow::anyhow!("ListRooms at {} failed: {e}; {hint}", api.url()))?;
    if existing.iter().all(|r| r.name != room) {
        // CreateRoom returns the existing room if another caller created it meanwhile.
        rooms
            .create_room(room, CreateRoomOptions::default())
            .await
            .map_err(|e| anyhow::anyhow!("CreateRoom `{room}` failed: {e}; {hint}"))?;
        say(&format!("room `{room}` did not exist: created it"));
    }
    let participants = api.list_participants(room).await?;
    let dispatches = api.list_dispatch(room).await?;
    let dispatch_id = match assess(&participants, &dispatches, agent_name, unix_ns()) {
        Finding::Present { identity } => {
            say(&format!("baton is already in room `{room}` (identity `{identity}`); nothing to do"));
            return Ok(Outcome::InRoom { identity });
        }
        Finding::Dispatched { dispatch_id } => {
            say(&format!(
                "`{agent_name}` is already dispatched to room `{room}` (dispatch {dispatch_id}); not dispatching again"
            ));
            dispatch_id
        }
        Finding::Missing => {
            let d = api.create_dispatch(room, agent_name, "").await?;
            say(&format!("dispatched `{agent_name}` to room `{room}` (dispatch {})", d.id));
            d.id
        }
    };
    let deadline = Instant::now() + wait;
    loop {
        let participants = api.list_participants(room).await?;
        if let Finding::Present { identity } = assess(&participants, &[], agent_name, unix_ns()) {
            say(&format!("baton is in room `{room}` (identity `{identity}`)"));
            return Ok(Outcome::InRoom { identity });
        }
        if Instant::now() >= deadline {
            return Ok(Outcome::NotYetInRoom { dispatch_id });
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

fn unix_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000_000_000;

    fn participant(identity: &str, attrs: &[(&str, &str)]) -> proto::ParticipantInfo {
        proto::ParticipantInfo {
            identity: identity.into(),
            kind: proto::participant_info::Kind::Agent as i32,
            attributes: attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    fn dispatch(
        id: &str,
        agent: &str,
        created_ago: Duration,
        jobs: &[proto::JobStatus],
    ) -> proto::AgentDispatch {
        proto::AgentDispatch {
            id: id.into(),
            agent_name: agent.into(),
            state: Some(proto::AgentDispatchState {
                created_at: NOW - created_ago.as_nanos() as i64,
                jobs: jobs
                    .iter()
                    .map(|s| proto::Job {
                        state: Some(proto::JobState { status: *s as i32, ..Default::default() }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_coordinator_participant_is_enough_whatever_the_dispatches_say() {
        let ps = [participant("caller", &[]), participant("baton-2", &[("baton.role", "coordinator")])];
        assert_eq!(assess(&ps, &[], "baton", NOW), Finding::Present { identity: "baton-2".into() });
    }

    #[test]
    fn the_attribute_must_say_coordinator_on_an_agent() {
        let mut caller = participant("caller", &[("baton.role", "coordinator")]);
        caller.kind = proto::participant_info::Kind::Standard as i32;
        let ps = [participant("x", &[("baton.role", "observer")]), participant("baton", &[]), caller];
        assert_eq!(assess(&ps, &[], "baton", NOW), Finding::Missing);
    }

    #[test]
    fn a_fresh_or_running_dispatch_counts_an_ended_one_does_not() {
        let s = Duration::from_secs(1);
        let cases = [
            (dispatch("AD_1", "baton", s, &[]), true),
            (dispatch("AD_1", "baton", s, &[proto::JobStatus::JsPending]), true),
            (dispatch("AD_1", "baton", s, &[proto::JobStatus::JsRunning]), true),
            (dispatch("AD_1", "baton", s, &[proto::JobStatus::JsSuccess]), false),
            (dispatch("AD_1", "baton", s, &[proto::JobStatus::JsFailed, proto::JobStatus::JsSuccess]), false),
            (dispatch("AD_1", "baton", s, &[proto::JobStatus::JsFailed, proto::JobStatus::JsRunning]), true),
            // Never assigned for longer than a worker takes: the server dropped it.
            (dispatch("AD_1", "baton", UNASSIGNED_DISPATCH_STALE, &[]), false),
            (dispatch("AD_1", "triage", s, &[proto::JobStatus::JsRunning]), false),
            (dispatch("AD_1", "", s, &[]), false),
        ];
        for (d, counts) in cases {
            let want =
                if counts { Finding::Dispatched { dispatch_id: "AD_1".into() } } else { Finding::Missing };
            assert_eq!(assess(&[], std::slice::from_ref(&d), "baton", NOW), want, "{d:?}");
        }
    }

    #[test]
    fn a_deleted_dispatch_does_not_count() {
        let mut d = dispatch("AD_1", "baton", Duration::from_secs(1), &[proto::JobStatus::JsRunning]);
        if let Some(s) = d.state.as_mut() {
            s.deleted_at = NOW;
        }
        assert_eq!(assess(&[], &[d], "baton", NOW), Finding::Missing);
    }

    #[test]
    fn the_live_dispatch_is_found_among_ended_ones() {
        let s = Duration::from_secs(5);
        let ds = [
            dispatch("AD_old", "baton", s, &[proto::JobStatus::JsSuccess]),
            dispatch("AD_new", "baton", s, &[proto::JobStatus::JsRunning]),
        ];
        assert_eq!(assess(&[], &ds, "baton", NOW), Finding::Dispatched { dispatch_id: "AD_new".into() });
    }
}
