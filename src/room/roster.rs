//! Who is in the room, kept current from the server's participant updates.
//!
//! Pure bookkeeping: it takes `ParticipantInfo`s and reports what changed, so the join/leave
//! logic is testable without a server and the room task decides what to do about each change.

use std::collections::{BTreeMap, HashMap};

use livekit_protocol as proto;
use proto::participant_info::{Kind, State};

/// One published track as the room sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackState {
    pub sid: String,
    pub name: String,
    pub kind: proto::TrackType,
    pub source: proto::TrackSource,
    pub muted: bool,
}

/// A participant other than baton itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub sid: String,
    pub identity: String,
    pub name: String,
    pub kind: Kind,
    pub state: State,
    pub attributes: HashMap<String, String>,
    pub tracks: Vec<TrackState>,
    /// The server's per-participant version; older updates arriving late are ignored.
    pub version: u32,
}

impl Member {
    fn from_info(info: &proto::ParticipantInfo) -> Self {
        Self {
            sid: info.sid.clone(),
            identity: info.identity.clone(),
            name: info.name.clone(),
            kind: Kind::try_from(info.kind).unwrap_or(Kind::Standard),
            state: State::try_from(info.state).unwrap_or(State::Joining),
            attributes: info.attributes.clone(),
            tracks: info
                .tracks
                .iter()
                .map(|t| TrackState {
                    sid: t.sid.clone(),
                    name: t.name.clone(),
                    kind: proto::TrackType::try_from(t.r#type).unwrap_or(proto::TrackType::Audio),
                    source: proto::TrackSource::try_from(t.source).unwrap_or_default(),
                    muted: t.muted,
                })
                .collect(),
            version: info.version,
        }
    }

    /// The agent name of an agent participant, when it has one: the `lk.agent.name` attribute
    /// livekit-agents publishes, else the `lk.agent_name` the LiveKit server puts in the token
    /// of an agent it dispatches (docs/protocol.md, "Who may send what"). Empty counts as none.
    pub fn agent_name(&self) -> Option<&str> {
        ["lk.agent.name", "lk.agent_name"]
            .into_iter()
            .filter_map(|key| self.attributes.get(key))
            .map(String::as_str)
            .find(|s| !s.is_empty())
    }
}

/// What one update changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Joined(Member),
    Updated { before: Member, after: Member },
    Left(Member),
}

/// The room's participants, by identity.
#[derive(Debug, Default)]
pub struct Roster {
    members: BTreeMap<String, Member>,
    own_sid: String,
}

impl Roster {
    /// Starts from a join response: everyone already in the room.
    pub fn new(own_sid: &str, others: &[proto::ParticipantInfo]) -> (Self, Vec<Change>) {
        let mut roster = Self { members: BTreeMap::new(), own_sid: own_sid.to_string() };
        let changes = roster.apply(others);
        (roster, changes)
    }

    /// Applies a batch of participant infos (a `ParticipantUpdate`), returning what changed.
    pub fn apply(&mut self, infos: &[proto::ParticipantInfo]) -> Vec<Change> {
        let mut changes = Vec::new();
        for info in infos {
            if info.sid == self.own_sid {
                continue;
            }
            let incoming = Member::from_info(info);
            let gone = incoming.state == State::Disconnected;
            match self.members.get(&incoming.identity) {
                // A participant that reconnects under the same identity gets a new sid; a
                // stale update for the old sid must not disturb the new one.
                Some(cur) if cur.sid == incoming.sid && incoming.version < cur.version => continue,
                Some(cur) if cur.sid != incoming.sid && gone => continue,
                _ => {}
            }
            if gone {
                if let Some(before) = self.members.remove(&incoming.identity) {
                    changes.push(Change::Left(before));
                }
                continue;
            }
            match self.members.insert(incoming.identity.clone(), incoming.clone()) {
                None => changes.push(Change::Joined(incoming)),
                Some(before) if before != incoming => {
                    changes.push(Change::Updated { before, after: incoming })
                }
                Some(_) => {}
            }
        }
        changes
    }

    pub fn get(&self, identity: &str) -> Option<&Member> {
        self.members.get(identity)
    }

    pub fn by_sid(&self, sid: &str) -> Option<&Member> {
        self.members.values().find(|m| m.sid == sid)
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// Whether a participant of `kind` is a caller (a person on the web or on the phone), as baton's
/// session counts them: agents, egress and ingress do not keep a call going.
pub fn is_caller(kind: Kind) -> bool {
    matches!(kind, Kind::Standard | Kind::Sip)
}

/// A participant as the server announces one that has just joined: active, version 1, sid
/// `PA_<identity>`, and for `agent_name` the agent-name attribute (`lk.agent.name`, see
/// [`Member::agent_name`]). For tests and fuzz targets, which build rooms without a server.
#[doc(hidden)]
pub fn announced(identity: &str, kind: Kind, agent_name: Option<&str>) -> proto::ParticipantInfo {
    proto::ParticipantInfo {
        sid: format!("PA_{identity}"),
        identity: identity.into(),
        state: State::Active as i32,
        kind: kind as i32,
        version: 1,
        attributes: agent_name.map(|a| ("lk.agent.name".to_string(), a.to_string())).into_iter().collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(sid: &str, identity: &str, state: State, version: u32) -> proto::ParticipantInfo {
        proto::ParticipantInfo {
            sid: sid.into(),
            identity: identity.into(),
            state: state as i32,
            version,
            kind: Kind::Agent as i32,
            ..Default::default()
        }
    }

    #[test]
    fn join_update_leave() {
        let (mut r, ch) = Roster::new("ME", &[info("PA_1", "caller", State::Active, 1)]);
        assert!(matches!(&ch[..], [Change::Joined(m)] if m.identity == "caller"));

        let mut upd = info("PA_1", "caller", State::Active, 2);
        upd.tracks.push(proto::TrackInfo {
            sid: "TR_1".into(),
            r#type: proto::TrackType::Audio as i32,
            muted: true,
            ..Default::default()
        });
        let ch = r.apply(&[upd]);
        match &ch[..] {
            [Change::Updated { after, .. }] => {
                assert_eq!(after.tracks.len(), 1);
                assert!(after.tracks[0].muted);
            }
            other => panic!("{other:?}"),
        }

        let ch = r.apply(&[info("PA_1", "caller", State::Disconnected, 3)]);
        assert!(matches!(&ch[..], [Change::Left(m)] if m.sid == "PA_1"));
        assert!(r.is_empty());
    }

    #[test]
    fn own_participant_and_stale_versions_are_ignored() {
        let (mut r, _) = Roster::new("ME", &[]);
        assert!(r.apply(&[info("ME", "baton", State::Active, 1)]).is_empty());
        r.apply(&[info("PA_1", "a", State::Active, 5)]);
        assert!(r.apply(&[info("PA_1", "a", State::Joined, 4)]).is_empty());
        assert_eq!(r.get("a").map(|m| m.state), Some(State::Active));
    }

    #[test]
    fn identical_update_reports_nothing() {
        let (mut r, _) = Roster::new("ME", &[info("PA_1", "a", State::Active, 1)]);
        assert!(r.apply(&[info("PA_1", "a", State::Active, 1)]).is_empty());
    }

    #[test]
    fn stale_disconnect_of_previous_session_keeps_the_new_one() {
        let (mut r, _) = Roster::new("ME", &[info("PA_new", "a", State::Active, 1)]);
        assert!(r.apply(&[info("PA_old", "a", State::Disconnected, 9)]).is_empty());
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn agent_name_attribute_is_lk_agent_name_first_then_the_servers() {
        let name = |attributes: &[(&str, &str)]| {
            let mut i = info("PA_1", "agent-1", State::Active, 1);
            i.attributes = attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let (r, _) = Roster::new("ME", &[i]);
            r.get("agent-1").and_then(Member::agent_name).map(str::to_string)
        };
        assert_eq!(name(&[("lk.agent.name", "triage")]).as_deref(), Some("triage"));
        assert_eq!(name(&[("lk.agent_name", "triage")]).as_deref(), Some("triage"), "the fallback");
        assert_eq!(
            name(&[("lk.agent.name", "billing"), ("lk.agent_name", "triage")]).as_deref(),
            Some("billing"),
            "lk.agent.name wins"
        );
        assert_eq!(name(&[("lk.agent.name", ""), ("lk.agent_name", "triage")]).as_deref(), Some("triage"));
        assert_eq!(name(&[("lk.agent.name", "")]), None);
        assert_eq!(name(&[]), None);
    }
}
