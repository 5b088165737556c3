//! The recent history the call timeline page shows: per call (one stay of baton in one room),
//! its event lines, bounded.

use std::collections::VecDeque;

use super::event::Event;

/// Ended calls kept for the page; the oldest ended call goes first. Calls in progress are
/// always kept (a worker's `max_rooms` bounds them).
const ENDED_CALLS_KEPT: usize = 20;
/// Event lines kept per call; beyond this the oldest go (counted in `dropped_events`). A
/// handoff makes about 15.
const EVENTS_PER_CALL: usize = 600;
/// Calls whose events `/api/calls` includes by default (the most recent ones).
pub const DEFAULT_DETAILED: usize = 10;

/// Identifies one call in the log.
pub type CallId = u64;

#[derive(Debug)]
struct Call {
    id: CallId,
    room: String,
    joined_unix_ms: Option<u64>,
    left_unix_ms: Option<u64>,
    /// The agent identity holding the floor, by the last `floor_granted`.
    holder: Option<String>,
    handoffs: u64,
    events: VecDeque<String>,
    dropped_events: u64,
}

/// The calls the page can show.
#[derive(Debug, Default)]
pub struct CallLog {
    calls: VecDeque<Call>,
    next_id: CallId,
}

impl CallLog {
    /// Starts a call in `room` and returns its id.
    pub fn open(&mut self, room: &str) -> CallId {
        self.next_id += 1;
        self.calls.push_back(Call {
            id: self.next_id,
            room: room.to_string(),
            joined_unix_ms: None,
            left_unix_ms: None,
            holder: None,
            handoffs: 0,
            events: VecDeque::new(),
            dropped_events: 0,
        });
        self.evict();
        self.next_id
    }

    /// Adds one event (and its line) to a call; unknown (evicted) calls are ignored.
    pub fn record(&mut self, id: CallId, event: &Event, line: &str, time_unix_ms: u64) {
        let Some(call) = self.calls.iter_mut().find(|c| c.id == id) else { return };
        match event {
            Event::RoomJoined => call.joined_unix_ms = call.joined_unix_ms.or(Some(time_unix_ms)),
            Event::RoomLeft => call.left_unix_ms = Some(time_unix_ms),
            Event::FloorGranted(f) => call.holder = Some(f.identity.clone()),
            Event::HandoffFinished(..) => call.handoffs += 1,
            _ => {}
        }
        if call.events.len() == EVENTS_PER_CALL {
            call.events.pop_front();
            call.dropped_events += 1;
        }
        call.events.push_back(line.to_string());
        if matches!(event, Event::RoomLeft) {
            self.evict();
        }
    }

    fn evict(&mut self) {
        let ended = self.calls.iter().filter(|c| c.left_unix_ms.is_some()).count();
        if ended > ENDED_CALLS_KEPT
            && let Some(oldest) = self.calls.iter().position(|c| c.left_unix_ms.is_some())
        {
            self.calls.remove(oldest);
        }
    }

    /// The `/api/calls` document: every call, newest first, with the event lines of the
    /// `detailed` most recent ones (`docs/events.md`, "The call timeline page").
    pub fn to_json(&self, now_unix_ms: u64, detailed: usize) -> String {
        let mut out = format!(r#"{{"v":{},"now_unix_ms":{now_unix_ms},"calls":["#, super::SCHEMA_VERSION);
        for (i, call) in self.calls.iter().rev().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let opt = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
            let holder = call.holder.as_deref().map_or("null".to_string(), json_string);
            out.push_str(&format!(
                r#"{{"call":{},"room":{},"joined_unix_ms":{},"left_unix_ms":{},"holder":{holder},"handoffs":{},"dropped_events":{}"#,
                call.id,
                json_string(&call.room),
                opt(call.joined_unix_ms),
                opt(call.left_unix_ms),
                call.handoffs,
                call.dropped_events,
            ));
            if i < detailed {
                out.push_str(r#","events":["#);
                for (j, line) in call.events.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    // Each line is a whole JSON object already.
                    out.push_str(line);
                }
                out.push(']');
            }
            out.push('}');
        }
        out.push_str("]}");
        out
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::event::FloorGranted;
    use serde_json::Value;

    #[test]
    fn calls_are_listed_newest_first_with_their_events_and_ended_ones_are_bounded() {
        let mut log = CallLog::default();
        let first = log.open("room \"one\"");
        log.record(first, &Event::RoomJoined, r#"{"event":"room_joined"}"#, 10);
        let granted = Event::FloorGranted(FloorGranted {
            identity: "agent-a".into(),
            cause: baton_floor::ActivateCause::Start,
            handoff: None,
        });
        log.record(first, &granted, r#"{"event":"floor_granted"}"#, 11);
        let second = log.open("two");
        let v: Value = serde_json::from_str(&log.to_json(99, 1)).expect("valid JSON");
        assert_eq!(v["calls"][0]["call"], second);
        assert!(v["calls"][0]["events"].as_array().is_some_and(Vec::is_empty));
        assert_eq!(v["calls"][1]["room"], "room \"one\"");
        assert_eq!(v["calls"][1]["holder"], "agent-a");
        assert!(v["calls"][1].get("events").is_none(), "only the most recent call is detailed");
        for _ in 0..ENDED_CALLS_KEPT + 5 {
            let id = log.open("r");
            log.record(id, &Event::RoomLeft, "{}", 1);
        }
        let v: Value = serde_json::from_str(&log.to_json(99, 50)).expect("valid JSON");
        let calls = v["calls"].as_array().expect("array");
        assert_eq!(calls.iter().filter(|c| c["left_unix_ms"].is_null()).count(), 2, "live calls stay");
        assert_eq!(calls.len(), ENDED_CALLS_KEPT + 2);
        assert_eq!(calls[0]["events"][0], serde_json::json!({}));
    }
}
