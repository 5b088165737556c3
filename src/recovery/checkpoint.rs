//! Checkpoints (`baton.checkpoint/1`, docs/protocol.md section 3.x) and the recovery bundle.
//!
//! An agent streams its state to baton while the call runs: a *base* checkpoint carries all of
//! it, a *delta* only what changed since the previous one. [`Checkpoints`] holds one merged state
//! per agent name in one room, so that after a crash baton can hand the replacement everything up
//! to the last turn boundary, as a `baton.bundle/1` with `"cause":"recovery"` (docs/bundle.md).
//!
//! Sans-IO and clock-free: the relay passes in the payload bytes, the sender and the time, and
//! turns a [`Refusal`] into an xfer ERROR (code 14 `checkpoint_rejected`, or 6 `buffer_full`).
//!
//! Memory: items and the two state objects are kept as their canonical JSON text, not as parsed
//! trees, so a merged state costs about its encoded size plus an index of item ids.

use std::collections::{BTreeMap, HashMap, HashSet};

use baton_transfer::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The payload's `schema` member.
pub const SCHEMA: &str = "baton.checkpoint/1";
/// Transfer metadata `purpose` of a checkpoint (leg 1, agent → baton).
pub const PURPOSE: &str = "checkpoint";
/// Transfer metadata `content_type` of a checkpoint.
pub const CONTENT_TYPE: &str = "application/vnd.baton.checkpoint+json";
/// Transfer metadata `purpose` of a recovery bundle (leg 2, baton → replacement).
pub const RECOVERY_PURPOSE: &str = "recovery";
/// Transfer metadata `content_type` of a bundle (docs/bundle.md).
pub const BUNDLE_CONTENT_TYPE: &str = "application/vnd.baton.bundle+json";
/// The bundle schema baton builds.
pub const BUNDLE_SCHEMA: &str = "baton.bundle/1";

/// Chat item types of livekit-agents' `ChatContext` (docs/bundle.md, `chat`), in the order the
/// bundle's `summary.counts` lists them.
const ITEM_TYPES: [&str; 5] =
    ["message", "function_call", "function_call_output", "agent_handoff", "agent_config_update"];

/// Bookkeeping bytes charged per kept item or journal entry on top of its text (index entry,
/// struct); keeps a flood of tiny items from slipping under the cap.
const PER_ENTRY_OVERHEAD: usize = 96;

/// Why a checkpoint was refused. The xfer ERROR's reason is this value's `Display`, which starts
/// with [`Refusal::reason`] (`out_of_sequence: expected seq 8, got 9`). On any refusal the
/// adapter's next checkpoint is a base.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not valid JSON, wrong schema, a member of the wrong type, or over the size limit.
    #[error("bad_checkpoint: {0}")]
    BadCheckpoint(String),
    /// The payload's `agent` is not the sender's `lk.agent.name`.
    #[error("wrong_agent: the checkpoint is for {claimed:?}, the sender is {}", sender_is(.sender.as_deref()))]
    WrongAgent {
        /// The payload's `agent`.
        claimed: String,
        /// The sender's `lk.agent.name` (None: the sender is not an agent).
        sender: Option<String>,
    },
    /// The sender was declared crashed or replaced ([`Checkpoints::declare_stale`]).
    #[error("stale_sender: {identity} was declared crashed or replaced")]
    StaleSender {
        /// The sender's participant identity.
        identity: String,
    },
    /// A delta, but baton holds no base from this sender for this agent name.
    #[error("no_base: no base checkpoint from this sender for agent {agent:?}; send a base")]
    NoBase {
        /// The agent name.
        agent: String,
    },
    /// A delta whose `seq` is not the previous one plus 1.
    #[error("out_of_sequence: expected seq {expected}, got {got}")]
    OutOfSequence {
        /// `last_seq + 1` (0 when the last seq was `u64::MAX`).
        expected: u64,
        /// The payload's `seq`.
        got: u64,
    },
    /// Keeping the merged state would exceed the room's cap ([`Limits::max_state_bytes`]).
    #[error("buffer_full: the merged checkpoints would take {needed} bytes, the room's cap is {cap}")]
    BufferFull {
        /// Bytes the room's merged states would take with this checkpoint.
        needed: usize,
        /// The cap.
        cap: usize,
    },
}

/// How a refusal names the sender of a checkpoint for the wrong agent.
fn sender_is(agent_name: Option<&str>) -> String {
    match agent_name {
        Some(name) => format!("agent {name:?}"),
        None => "not a named agent participant".into(),
    }
}

impl Refusal {
    /// The stable reason token the wire text starts with (`out_of_sequence`, `no_base`,
    /// `wrong_agent`, `bad_checkpoint`, `stale_sender`, `buffer_full`).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadCheckpoint(_) => "bad_checkpoint",
            Refusal::WrongAgent { .. } => "wrong_agent",
            Refusal::StaleSender { .. } => "stale_sender",
            Refusal::NoBase { .. } => "no_base",
            Refusal::OutOfSequence { .. } => "out_of_sequence",
            Refusal::BufferFull { .. } => "buffer_full",
        }
    }

    /// The xfer error code to refuse with: 6 `buffer_full` for the cap (as for bundles), 14
    /// `checkpoint_rejected` for the rest.
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::BufferFull { .. } => ErrorCode::BufferFull,
            _ => ErrorCode::CheckpointRejected,
        }
    }
}

/// A tool call's `rerun` class (docs/bundle.md, `tool_calls_in_flight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rerun {
    /// The side effect may already have happened: check before running it again.
    Never,
    /// Retry only with the same idempotency key.
    IfIdempotent,
    /// Read-only: retry freely.
    Safe,
}

/// Where a journaled tool call stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    /// Started, not finished: in flight.
    Started,
    /// Finished with `output`.
    Finished,
    /// Cancelled; `output` (when present) says why.
    Cancelled,
}

/// One entry of the tool-call journal a checkpoint carries (`lk_baton.checkpoint.journal_entry`
/// builds it from `lk_baton.journal`). Members beyond these are ignored. `O` is how `output` is
/// held: a validated [`Item`] once parsed, the raw object on the wire.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JournalEntry<O = Item> {
    /// The `function_call` item's `call_id`.
    pub call_id: String,
    /// The tool's name.
    pub name: String,
    /// The call's arguments, a JSON string.
    pub arguments: String,
    /// Epoch seconds.
    pub started_at: f64,
    /// The key the tool's backend deduplicates on.
    pub idempotency_key: String,
    /// May the call be run again.
    pub rerun: Rerun,
    /// Started, finished or cancelled.
    pub status: CallStatus,
    /// Text for the next agent.
    #[serde(default)]
    pub note: Option<String>,
    /// The `function_call_output` chat item of an ended call (its `call_id` is this entry's),
    /// None while it runs.
    #[serde(default = "Option::default")]
    pub output: Option<O>,
}

type WireEntry = JournalEntry<Map<String, Value>>;

impl JournalEntry {
    fn cost(&self) -> usize {
        PER_ENTRY_OVERHEAD
            + self.call_id.len()
            + self.name.len()
            + self.arguments.len()
            + self.idempotency_key.len()
            + self.note.as_ref().map_or(0, String::len)
            + self.output.as_ref().map_or(0, Item::cost)
    }
}

/// A parsed, validated `baton.checkpoint/1` payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The agent name the state belongs to.
    pub agent: String,
    /// Sequence number; a delta must be the previous one plus 1.
    pub seq: u64,
    /// True: the complete state. False: the changes since the previous checkpoint.
    pub base: bool,
    /// Epoch seconds.
    pub created_at: f64,
    /// Chat items added or changed, in context order.
    pub items: Vec<Item>,
    /// Canonical JSON of `user_state` (an object) when present.
    pub user_state: Option<String>,
    /// Canonical JSON of `agent_state` (an object) when present.
    pub agent_state: Option<String>,
    /// Journal entries added or changed.
    pub journal: Vec<JournalEntry>,
}

/// One chat item, kept as its canonical JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The item's `id`.
    pub id: String,
    /// Index into the chat item types (`message`, `function_call`, ...).
    kind: usize,
    /// `call_id` of a `function_call` / `function_call_output`.
    call_id: Option<String>,
    /// Canonical JSON of the whole item.
    pub json: String,
}

impl Item {
    /// The item's `type`.
    pub fn kind(&self) -> &'static str {
        ITEM_TYPES[self.kind]
    }

    fn cost(&self) -> usize {
        PER_ENTRY_OVERHEAD + 2 * self.id.len() + self.json.len()
    }
}

#[derive(Deserialize)]
struct Wire {
    schema: String,
    agent: String,
    seq: u64,
    base: bool,
    created_at: f64,
    items: Vec<Map<String, Value>>,
    #[serde(default)]
    user_state: Option<Map<String, Value>>,
    #[serde(default)]
    agent_state: Option<Map<String, Value>>,
    journal: Vec<WireEntry>,
}

fn epoch(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

fn is_epoch(v: Option<&Value>) -> bool {
    v.and_then(Value::as_f64).is_some_and(epoch)
}

fn bad(msg: impl Into<String>) -> Refusal {
    Refusal::BadCheckpoint(msg.into())
}

/// Checks one chat item as docs/bundle.md (`chat`) and `lk_baton.bundle.problems` do, so that
/// the recovery bundle baton builds from it is valid.
fn item(n: usize, it: Map<String, Value>) -> Result<Item, Refusal> {
    let at = |k: &str| format!("items[{n}].{k}");
    let str_of = |k: &str| it.get(k).and_then(Value::as_str);
    let ty = str_of("type").unwrap_or_default();
    let Some(kind) = ITEM_TYPES.iter().position(|t| *t == ty) else {
        return Err(bad(format!("{} must be one of {}", at("type"), ITEM_TYPES.join(", "))));
    };
    let Some(id) = str_of("id").filter(|s| !s.is_empty()) else {
        return Err(bad(format!("{} must be a non-empty string", at("id"))));
    };
    if !is_epoch(it.get("created_at")) {
        return Err(bad(format!(
            "{} missing: serialise with ChatContext.to_dict(exclude_timestamp=False)",
            at("created_at")
        )));
    }
    let need_str = |keys: &[&str]| -> Result<(), Refusal> {
        match keys.iter().find(|k| str_of(k).is_none()) {
            Some(k) => Err(bad(format!("{} must be a string", at(k)))),
            None => Ok(()),
        }
    };
    match ty {
        "message" => {
            if !matches!(str_of("role"), Some("developer" | "system" | "user" | "assistant")) {
                return Err(bad(format!("{} must be developer, system, user or assistant", at("role"))));
            }
            if !it.get("content").is_some_and(Value::is_array) {
                return Err(bad(format!("{} must be an array", at("content"))));
            }
        }
        "function_call" => need_str(&["call_id", "name", "arguments"])?,
        "function_call_output" => {
            need_str(&["call_id", "output"])?;
            if it.get("is_error").is_some_and(|v| !v.is_boolean()) {
                return Err(bad(format!("{} must be a boolean", at("is_error"))));
            }
        }
        "agent_handoff" => need_str(&["new_agent_id"])?,
        _ => {}
    }
    let id = id.to_owned();
    let call_id = str_of("call_id").filter(|_| kind == 1 || kind == 2).map(str::to_owned);
    let json = Value::Object(it).to_string();
    Ok(Item { id, kind, call_id, json })
}

/// Checks `agent_state` as docs/bundle.md does (`attempts`, `outcome`, `data`).
fn agent_state(st: &Map<String, Value>) -> Result<(), Refusal> {
    if let Some(at) = st.get("attempts") {
        let ok = at.as_array().is_some_and(|list| {
            list.iter().all(|a| {
                a.get("action").is_some_and(Value::is_string)
                    && a.get("outcome").is_none_or(Value::is_string)
                    && (a.get("at").is_none() || is_epoch(a.get("at")))
            })
        });
        if !ok {
            return Err(bad("agent_state.attempts must be a list of {action, outcome?, at?}"));
        }
    }
    if st.get("outcome").is_some_and(|v| !v.is_string()) {
        return Err(bad("agent_state.outcome must be a string"));
    }
    if st.get("data").is_some_and(|v| !v.is_object()) {
        return Err(bad("agent_state.data must be an object"));
    }
    Ok(())
}

fn journal_entry(n: usize, e: WireEntry) -> Result<JournalEntry, Refusal> {
    for (k, v) in [("call_id", &e.call_id), ("name", &e.name), ("idempotency_key", &e.idempotency_key)] {
        if v.is_empty() {
            return Err(bad(format!("journal[{n}].{k} must be a non-empty string")));
        }
    }
    if !epoch(e.started_at) {
        return Err(bad(format!("journal[{n}].started_at must be epoch seconds")));
    }
    let JournalEntry { call_id, name, arguments, started_at, idempotency_key, rerun, status, note, output } =
        e;
    let output = match output {
        None => None,
        Some(o) => {
            let o = item(n, o).map_err(|r| match r {
                Refusal::BadCheckpoint(m) => bad(format!("journal[{n}].output: {m}")),
                r => r,
            })?;
            if o.kind != 2 || o.call_id.as_deref() != Some(call_id.as_str()) {
                return Err(bad(format!("journal[{n}].output must be the call's function_call_output item")));
            }
            Some(o)
        }
    };
    Ok(JournalEntry { call_id, name, arguments, started_at, idempotency_key, rerun, status, note, output })
}

/// Parses and validates a checkpoint payload of at most `max_size` bytes.
///
/// Errors: [`Refusal::BadCheckpoint`] naming the first problem (size, JSON, schema, a member's
/// type). Never panics; serde_json bounds nesting depth (128).
pub fn parse(payload: &[u8], max_size: usize) -> Result<Checkpoint, Refusal> {
    if payload.len() > max_size {
        return Err(bad(format!("{} bytes, more than the limit of {max_size}", payload.len())));
    }
    let wire: Wire = serde_json::from_slice(payload).map_err(|e| {
        // Name a wrong schema rather than the first field a newer schema lacks.
        #[derive(Deserialize)]
        struct Peek {
            schema: Option<Value>,
        }
        match serde_json::from_slice::<Peek>(payload) {
            Ok(Peek { schema: Some(s) }) if s != SCHEMA => bad(format!("schema must be {SCHEMA:?}, got {s}")),
            _ => bad(format!("not a checkpoint: {e}")),
        }
    })?;
    if wire.schema != SCHEMA {
        return Err(bad(format!("schema must be {SCHEMA:?}, got {:?}", wire.schema)));
    }
    if wire.agent.is_empty() || wire.agent.len() > 128 {
        return Err(bad("agent must be a string of 1..128 characters"));
    }
    if !epoch(wire.created_at) {
        return Err(bad("created_at must be epoch seconds"));
    }
    let items =
        wire.items.into_iter().enumerate().map(|(n, it)| item(n, it)).collect::<Result<Vec<_>, _>>()?;
    if wire.base && (wire.user_state.is_none() || wire.agent_state.is_none()) {
        return Err(bad("a base carries user_state and agent_state"));
    }
    if let Some(st) = &wire.agent_state {
        agent_state(st)?;
    }
    let journal = wire
        .journal
        .into_iter()
        .enumerate()
        .map(|(n, e)| journal_entry(n, e))
        .collect::<Result<Vec<_>, _>>()?;
    let object = |m: Option<Map<String, Value>>| m.map(|m| Value::Object(m).to_string());
    Ok(Checkpoint {
        agent: wire.agent,
        seq: wire.seq,
        base: wire.base,
        created_at: wire.created_at,
        items,
        user_state: object(wire.user_state),
        agent_state: object(wire.agent_state),
        journal,
    })
}

/// The merged state of one agent name: what a replacement is hydrated from.
#[derive(Debug, Clone)]
pub struct Merged {
    owner: String,
    agent: String,
    last_seq: u64,
    created_at: f64,
    items: Vec<Item>,
    by_id: HashMap<String, usize>,
    user_state: String,
    agent_state: String,
    journal: Vec<JournalEntry>,
    by_call: HashMap<String, usize>,
    bytes: usize,
}

impl Merged {
    fn empty(owner: &str, agent: &str) -> Self {
        Merged {
            owner: owner.into(),
            agent: agent.into(),
            last_seq: 0,
            created_at: 0.0,
            items: Vec::new(),
            by_id: HashMap::new(),
            user_state: "{}".into(),
            agent_state: "{}".into(),
            journal: Vec::new(),
            by_call: HashMap::new(),
            bytes: 4,
        }
    }

    /// Identity of the participant that sent the last base.
    pub fn owner(&self) -> &str {
        &self.owner
    }
    /// The agent name.
    pub fn agent(&self) -> &str {
        &self.agent
    }
    /// `seq` of the last applied checkpoint.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }
    /// `created_at` of the last applied checkpoint (epoch seconds).
    pub fn created_at(&self) -> f64 {
        self.created_at
    }
    /// The chat items, in context order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }
    /// The tool-call journal, in first-seen order.
    pub fn journal(&self) -> &[JournalEntry] {
        &self.journal
    }
    /// Canonical JSON of `user_state`.
    pub fn user_state(&self) -> &str {
        &self.user_state
    }
    /// Canonical JSON of `agent_state`.
    pub fn agent_state(&self) -> &str {
        &self.agent_state
    }
    /// Approximate bytes this state holds (texts plus per-entry bookkeeping), what the room's cap
    /// counts.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes this state would take with the delta `cp` applied (without applying it).
    fn bytes_after(&self, cp: &Checkpoint) -> usize {
        let mut bytes = self.bytes;
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for it in &cp.items {
            let old = seen
                .get(it.id.as_str())
                .copied()
                .or_else(|| self.by_id.get(&it.id).map(|&i| self.items[i].cost()));
            bytes = bytes - old.unwrap_or(0) + it.cost();
            seen.insert(&it.id, it.cost());
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for e in &cp.journal {
            let old = seen
                .get(e.call_id.as_str())
                .copied()
                .or_else(|| self.by_call.get(&e.call_id).map(|&i| self.journal[i].cost()));
            bytes = bytes - old.unwrap_or(0) + e.cost();
            seen.insert(&e.call_id, e.cost());
        }
        if let Some(s) = &cp.user_state {
            bytes = bytes - self.user_state.len() + s.len();
        }
        if let Some(s) = &cp.agent_state {
            bytes = bytes - self.agent_state.len() + s.len();
        }
        bytes
    }

    fn apply(&mut self, cp: Checkpoint) {
        self.last_seq = cp.seq;
        self.created_at = cp.created_at;
        for it in cp.items {
            match self.by_id.get(&it.id) {
                Some(&i) => self.items[i] = it,
                None => {
                    self.by_id.insert(it.id.clone(), self.items.len());
                    self.items.push(it);
                }
            }
        }
        for e in cp.journal {
            match self.by_call.get(&e.call_id) {
                Some(&i) => self.journal[i] = e,
                None => {
                    self.by_call.insert(e.call_id.clone(), self.journal.len());
                    self.journal.push(e);
                }
            }
        }
        if let Some(s) = cp.user_state {
            self.user_state = s;
        }
        if let Some(s) = cp.agent_state {
            self.agent_state = s;
        }
        self.bytes = 4
            + self.items.iter().map(Item::cost).sum::<usize>()
            + self.journal.iter().map(JournalEntry::cost).sum::<usize>()
            + self.user_state.len()
            + self.agent_state.len();
    }

    /// This state as one base `baton.checkpoint/1` payload (`seq` = [`last_seq`](Self::last_seq),
    /// canonical JSON): what the state store keeps, and what [`Checkpoints::apply`] turns back
    /// into this state (same items, journal, states and `seq`, so the owner's next delta
    /// applies) when a baton comes back to the room.
    pub fn base_checkpoint(&self) -> Vec<u8> {
        let items: Vec<&str> = self.items.iter().map(|it| it.json.as_str()).collect();
        let journal: Vec<String> = self.journal.iter().map(journal_json).collect();
        let mut body: BTreeMap<&str, String> = BTreeMap::new();
        body.insert("agent", json_str(&self.agent));
        body.insert("agent_state", self.agent_state.clone());
        body.insert("base", "true".into());
        body.insert("created_at", json_f64(self.created_at));
        body.insert("items", format!("[{}]", items.join(",")));
        body.insert("journal", format!("[{}]", journal.join(",")));
        body.insert("schema", json_str(SCHEMA));
        body.insert("seq", self.last_seq.to_string());
        body.insert("user_state", self.user_state.clone());
        object(&body).into_bytes()
    }

    /// The `baton.bundle/1` a replacement is hydrated from (docs/bundle.md, "Recovery bundles"),
    /// canonical JSON (keys sorted, no whitespace) with `summary` computed over the canonical
    /// encoding without it, as `lk_baton.bundle` does.
    ///
    /// `from_agent` = `to_agent` = the agent name, `cause` = `"recovery"`, `reason`,
    /// `handoff_id` (the recovery's id) and `created_at` (epoch seconds) as given. `chat.items`:
    /// the merged items in merged order, then the `output` item of each finished or cancelled
    /// journal entry whose `call_id` no `function_call_output` in the chat has, so a result that
    /// finished before the crash is there exactly once. `tool_calls_in_flight`: the entries with
    /// status `started`.
    pub fn recovery_bundle(&self, reason: &str, handoff_id: Option<&str>, created_at: f64) -> Vec<u8> {
        let mut answered: HashSet<&str> =
            self.items.iter().filter(|it| it.kind == 2).filter_map(|it| it.call_id.as_deref()).collect();
        let mut counts = [0usize; ITEM_TYPES.len()];
        let mut items: Vec<&str> = Vec::with_capacity(self.items.len() + self.journal.len());
        for it in &self.items {
            counts[it.kind] += 1;
            items.push(&it.json);
        }
        let mut in_flight: Vec<String> = Vec::new();
        for e in &self.journal {
            match (&e.output, e.status) {
                (_, CallStatus::Started) => in_flight.push(in_flight_entry(e)),
                (Some(out), _) if answered.insert(e.call_id.as_str()) => {
                    counts[out.kind] += 1;
                    items.push(&out.json);
                }
                _ => {}
            }
        }
        let n_items = items.len();
        let chat = format!("{{\"items\":[{}]}}", items.join(","));

        let mut body: BTreeMap<&str, String> = BTreeMap::new();
        body.insert("agent_state", self.agent_state.clone());
        body.insert("cause", json_str(RECOVERY_PURPOSE));
        body.insert("chat", chat);
        body.insert("created_at", json_f64(created_at));
        body.insert("from_agent", json_str(&self.agent));
        if let Some(h) = handoff_id {
            body.insert("handoff_id", json_str(h));
        }
        body.insert("reason", json_str(reason));
        body.insert("schema", json_str(BUNDLE_SCHEMA));
        body.insert("to_agent", json_str(&self.agent));
        body.insert("tool_calls_in_flight", format!("[{}]", in_flight.join(",")));
        body.insert("user_state", self.user_state.clone());
        let raw = object(&body);
        let mut c: BTreeMap<&str, usize> = ITEM_TYPES.iter().copied().zip(counts).collect();
        c.insert("items", n_items);
        c.insert("tool_calls_in_flight", in_flight.len());
        let counts = object(&c.into_iter().map(|(k, v)| (k, v.to_string())).collect());
        let summary = format!(
            "{{\"counts\":{counts},\"sha256\":\"{}\",\"size\":{}}}",
            hex::encode(Sha256::digest(raw.as_bytes())),
            raw.len()
        );
        body.insert("summary", summary);
        object(&body).into_bytes()
    }
}

fn json_str(s: &str) -> String {
    Value::from(s).to_string()
}

/// A finite float as JSON (serde_json's shortest round-trip form); a non-finite one as 0.
fn json_f64(v: f64) -> String {
    serde_json::Number::from_f64(v).map_or_else(|| "0".into(), |n| n.to_string())
}

/// `{"k":v,...}` from members whose values are JSON text, in the map's (sorted) order.
fn object(members: &BTreeMap<&str, String>) -> String {
    let inner: Vec<String> = members.iter().map(|(k, v)| format!("{}:{v}", json_str(k))).collect();
    format!("{{{}}}", inner.join(","))
}

/// A journal entry as the checkpoint wire carries it (status and output included).
fn journal_json(e: &JournalEntry) -> String {
    let mut m = entry_members(e);
    if let Some(o) = &e.output {
        m.insert("output", o.json.clone());
    }
    let status = match e.status {
        CallStatus::Started => "started",
        CallStatus::Finished => "finished",
        CallStatus::Cancelled => "cancelled",
    };
    m.insert("status", json_str(status));
    object(&m)
}

/// The members a journal entry has both on the checkpoint wire and in a bundle's
/// `tool_calls_in_flight`.
fn entry_members(e: &JournalEntry) -> BTreeMap<&'static str, String> {
    let mut m: BTreeMap<&str, String> = BTreeMap::new();
    m.insert("arguments", json_str(&e.arguments));
    m.insert("call_id", json_str(&e.call_id));
    m.insert("idempotency_key", json_str(&e.idempotency_key));
    m.insert("name", json_str(&e.name));
    if let Some(n) = &e.note {
        m.insert("note", json_str(n));
    }
    m.insert("rerun", json_str(rerun_name(e.rerun)));
    m.insert("started_at", json_f64(e.started_at));
    m
}

fn rerun_name(r: Rerun) -> &'static str {
    match r {
        Rerun::Never => "never",
        Rerun::IfIdempotent => "if_idempotent",
        Rerun::Safe => "safe",
    }
}

fn in_flight_entry(e: &JournalEntry) -> String {
    object(&entry_members(e))
}

/// Size limits of a room's checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest checkpoint payload in bytes (the transfer's `max_bundle_size`).
    pub max_checkpoint_size: usize,
    /// Cap on the merged states of all agents in the room together, in [`Merged::bytes`] (the
    /// bundle store's cap).
    pub max_state_bytes: usize,
}

impl Default for Limits {
    /// 32 MiB per checkpoint (the transfer's default `max_bundle_size`), 64 MiB per room. The
    /// relay does not use these: it takes its transfer limit and its bundle store's cap.
    fn default() -> Self {
        Limits { max_checkpoint_size: 32 << 20, max_state_bytes: 64 << 20 }
    }
}

/// What an applied checkpoint left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The agent name.
    pub agent: String,
    /// The checkpoint's `seq`.
    pub seq: u64,
    /// Whether it was a base.
    pub base: bool,
    /// Chat items in the merged state.
    pub items: usize,
    /// The merged state's [`Merged::bytes`].
    pub bytes: usize,
}

/// The checkpoints of one room: one merged state per agent name, owned by the identity that sent
/// its last base.
///
/// Mutators: [`apply`](Self::apply) (a received payload), [`declare_stale`](Self::declare_stale)
/// (an identity was declared crashed or replaced), [`remove`](Self::remove). Getters:
/// [`get`](Self::get), [`bytes`](Self::bytes). No timers, no output queue: every call answers
/// at once.
#[derive(Debug, Clone, Default)]
pub struct Checkpoints {
    limits: Limits,
    agents: BTreeMap<String, Merged>,
    stale: HashSet<String>,
}

impl Checkpoints {
    /// No state yet.
    pub fn new(limits: Limits) -> Self {
        Checkpoints { limits, agents: BTreeMap::new(), stale: HashSet::new() }
    }

    /// Applies a checkpoint `payload` from participant `identity` whose `lk.agent.name` is
    /// `agent_name` (None: not an agent).
    ///
    /// A base replaces the agent's state and makes `identity` its owner; a delta must come from
    /// the owner with `seq` = last + 1, and upserts items by `id` and journal entries by
    /// `call_id`, and replaces `user_state` / `agent_state` when present. On a refusal the state
    /// is unchanged. Errors: see [`Refusal`], checked in that order: stale sender, payload,
    /// agent name, sequence, room cap.
    pub fn apply(
        &mut self,
        identity: &str,
        agent_name: Option<&str>,
        payload: &[u8],
    ) -> Result<Applied, Refusal> {
        if self.stale.contains(identity) {
            return Err(Refusal::StaleSender { identity: identity.into() });
        }
        let cp = parse(payload, self.limits.max_checkpoint_size)?;
        if agent_name != Some(cp.agent.as_str()) {
            return Err(Refusal::WrongAgent { claimed: cp.agent, sender: agent_name.map(str::to_owned) });
        }
        let current = self.agents.get(&cp.agent);
        if !cp.base {
            match current {
                Some(m) if m.owner == identity => {
                    let expected = m.last_seq.wrapping_add(1);
                    if m.last_seq == u64::MAX || cp.seq != expected {
                        return Err(Refusal::OutOfSequence { expected, got: cp.seq });
                    }
                }
                _ => return Err(Refusal::NoBase { agent: cp.agent }),
            }
        }
        let others: usize = self.agents.iter().filter(|(k, _)| **k != cp.agent).map(|(_, m)| m.bytes).sum();
        let mine = match (cp.base, current) {
            (false, Some(m)) => m.bytes_after(&cp),
            _ => Merged::empty(identity, &cp.agent).bytes_after(&cp),
        };
        let needed = others + mine;
        if needed > self.limits.max_state_bytes {
            return Err(Refusal::BufferFull { needed, cap: self.limits.max_state_bytes });
        }
        let agent = cp.agent.clone();
        let (seq, base) = (cp.seq, cp.base);
        let merged = if base {
            self.agents.insert(agent.clone(), Merged::empty(identity, &agent));
            self.agents.get_mut(&agent)
        } else {
            self.agents.get_mut(&agent)
        };
        let Some(merged) = merged else {
            return Err(Refusal::NoBase { agent });
        };
        merged.apply(cp);
        Ok(Applied { agent, seq, base, items: merged.items.len(), bytes: merged.bytes })
    }

    /// Marks `identity` crashed or replaced: its checkpoints are refused from now on
    /// ([`Refusal::StaleSender`]); the state it owns stays, for its replacement.
    pub fn declare_stale(&mut self, identity: &str) {
        self.stale.insert(identity.into());
    }

    /// Whether `identity` was declared crashed or replaced.
    pub fn is_stale(&self, identity: &str) -> bool {
        self.stale.contains(identity)
    }

    /// The merged state of `agent`, if any checkpoint for it was applied.
    pub fn get(&self, agent: &str) -> Option<&Merged> {
        self.agents.get(agent)
    }

    /// The agent names with a merged checkpoint, in name order.
    pub fn agents(&self) -> impl Iterator<Item = &str> {
        self.agents.keys().map(String::as_str)
    }

    /// Forgets `agent`'s state.
    pub fn remove(&mut self, agent: &str) -> Option<Merged> {
        self.agents.remove(agent)
    }

    /// [`Merged::bytes`] of all agents together.
    pub fn bytes(&self) -> usize {
        self.agents.values().map(|m| m.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(id: &str, role: &str, text: &str, at: f64) -> Value {
        json!({"id": id, "type": "message", "role": role, "content": [text], "interrupted": false,
               "extra": {}, "created_at": at})
    }

    fn cp(seq: u64, base: bool, items: Vec<Value>, extra: Value) -> Vec<u8> {
        let mut v = json!({"schema": SCHEMA, "agent": "triage", "seq": seq, "base": base,
                           "created_at": 1796049000.25, "items": items, "journal": []});
        if base {
            v["user_state"] = json!({});
            v["agent_state"] = json!({});
        }
        if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        serde_json::to_vec(&v).expect("json")
    }

    fn entry(call_id: &str, status: &str, output: Option<&str>) -> Value {
        json!({"call_id": call_id, "name": "issue_refund", "arguments": "{\"amount\":5}",
               "started_at": 1796049000.1, "idempotency_key": format!("key-{call_id}"),
               "rerun": "never", "status": status, "note": null,
               "output": output.map(|o| json!({"id": format!("{call_id}_journal_output"), "type": "function_call_output",
                                               "call_id": call_id, "name": "issue_refund", "output": o,
                                               "is_error": status == "cancelled", "created_at": 1796049000.2}))})
    }

    fn room() -> Checkpoints {
        Checkpoints::new(Limits::default())
    }

    fn bundle(c: &Checkpoints) -> Value {
        let b =
            c.get("triage").expect("state").recovery_bundle("recovery after heartbeat", None, 1796049010.5);
        serde_json::from_slice(&b).expect("bundle is JSON")
    }

    fn ids(b: &Value) -> Vec<String> {
        b["chat"]["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["id"].as_str().expect("id").to_owned())
            .collect()
    }

    #[test]
    fn floats_come_back_exactly_as_the_agent_wrote_them() {
        // Seen in tests/e2e/test_recovery.py before serde_json's `float_roundtrip`: a
        // livekit-agents `metrics.stopped_speaking_at` of 1796061985.7692313 came back as
        // 1796061985.769231, so the replacement's item differed from the checkpointed one.
        let text = r#"{"content":["One moment."],"created_at":1796061983.3713264,"extra":{},"id":"m1","interrupted":false,"metrics":{"llm_node_ttft":0.0007316419978451449,"stopped_speaking_at":1796061985.7692313},"role":"assistant","type":"message"}"#;
        let item: Value = serde_json::from_str(text).expect("item");
        let mut c = room();
        c.apply("agent-1", Some("triage"), &cp(1, true, vec![item], json!({}))).expect("base");
        let b = c.get("triage").expect("state").recovery_bundle("r", None, 1.0);
        let b = String::from_utf8(b).expect("utf-8");
        assert!(b.contains(text), "{b}");
    }

    #[test]
    fn base_then_deltas_upsert_items_and_replace_state() {
        let mut c = room();
        let base = cp(
            1,
            true,
            vec![msg("u1", "user", "hi", 1.0)],
            json!({"user_state": {"a": 1}, "agent_state": {}}),
        );
        assert_eq!(c.apply("agent-1", Some("triage"), &base).map(|a| a.items), Ok(1));
        let d = cp(
            2,
            false,
            vec![msg("u1", "user", "hello", 1.0), msg("a1", "assistant", "yes?", 2.0)],
            json!({}),
        );
        c.apply("agent-1", Some("triage"), &d).expect("delta");
        let d = cp(3, false, vec![], json!({"user_state": {"a": 2}}));
        c.apply("agent-1", Some("triage"), &d).expect("delta");
        let m = c.get("triage").expect("state");
        assert_eq!(m.last_seq(), 3);
        assert_eq!(m.owner(), "agent-1");
        assert_eq!(m.user_state(), r#"{"a":2}"#);
        let b = bundle(&c);
        assert_eq!(ids(&b), ["u1", "a1"]);
        assert_eq!(b["chat"]["items"][0]["content"], json!(["hello"]));
        // A new base forgets what the old chain held.
        c.apply("agent-1", Some("triage"), &cp(9, true, vec![msg("x", "user", "x", 3.0)], json!({})))
            .expect("base");
        assert_eq!(ids(&bundle(&c)), ["x"]);
        assert_eq!(c.get("triage").map(|m| m.user_state()), Some("{}"));
    }

    #[test]
    fn a_base_checkpoint_of_the_merged_state_restores_it_and_the_next_delta_applies() {
        let mut c = room();
        let base = cp(4, true, vec![msg("u1", "user", "hi", 1.0)], json!({"user_state": {"a": 1}}));
        c.apply("agent-1", Some("triage"), &base).expect("base");
        let journal = json!({"journal": [entry("c1", "finished", Some("ok")), entry("c2", "started", None)]});
        c.apply("agent-1", Some("triage"), &cp(5, false, vec![msg("a1", "assistant", "yes", 2.0)], journal))
            .expect("delta");
        let stored = c.get("triage").expect("state").base_checkpoint();
        // A baton that comes back applies what the store kept, as from the same owner.
        let mut back = room();
        back.apply("agent-1", Some("triage"), &stored).expect("stored base applies");
        let (was, is) = (c.get("triage").expect("state"), back.get("triage").expect("restored"));
        assert_eq!((is.owner(), is.last_seq()), ("agent-1", 5));
        assert_eq!(is.items(), was.items());
        assert_eq!(is.journal(), was.journal());
        assert_eq!((is.user_state(), is.agent_state()), (was.user_state(), was.agent_state()));
        assert_eq!(is.recovery_bundle("r", None, 1.0), was.recovery_bundle("r", None, 1.0));
        let next = cp(6, false, vec![msg("u2", "user", "more", 3.0)], json!({}));
        assert_eq!(back.apply("agent-1", Some("triage"), &next).map(|a| a.items), Ok(3));
    }

    #[test]
    fn refusals_leave_the_state_unchanged() {
        let mut c = room();
        let d = cp(1, false, vec![], json!({}));
        assert_eq!(c.apply("agent-1", Some("triage"), &d).map_err(|e| e.reason()), Err("no_base"));
        c.apply("agent-1", Some("triage"), &cp(5, true, vec![msg("u1", "user", "hi", 1.0)], json!({})))
            .expect("base");
        let skip = cp(7, false, vec![msg("u2", "user", "lost", 2.0)], json!({}));
        let e = c.apply("agent-1", Some("triage"), &skip).expect_err("gap");
        assert_eq!(e, Refusal::OutOfSequence { expected: 6, got: 7 });
        assert!(e.to_string().starts_with("out_of_sequence: "));
        assert_eq!(e.code(), ErrorCode::CheckpointRejected);
        let replay = cp(5, false, vec![], json!({}));
        assert_eq!(
            c.apply("agent-1", Some("triage"), &replay).map_err(|e| e.reason()),
            Err("out_of_sequence")
        );
        // A delta from another identity than the base's sender.
        let other = cp(6, false, vec![], json!({}));
        assert_eq!(c.apply("agent-2", Some("triage"), &other).map_err(|e| e.reason()), Err("no_base"));
        assert_eq!(c.apply("agent-1", Some("billing"), &other).map_err(|e| e.reason()), Err("wrong_agent"));
        assert_eq!(c.apply("caller", None, &other).map_err(|e| e.reason()), Err("wrong_agent"));
        assert_eq!(c.apply("agent-1", Some("triage"), b"{").map_err(|e| e.reason()), Err("bad_checkpoint"));
        c.declare_stale("agent-1");
        let next = cp(6, false, vec![msg("u3", "user", "x", 3.0)], json!({}));
        assert_eq!(c.apply("agent-1", Some("triage"), &next).map_err(|e| e.reason()), Err("stale_sender"));
        let m = c.get("triage").expect("state kept for the replacement");
        assert_eq!((m.last_seq(), m.items().len(), m.owner()), (5, 1, "agent-1"));
        // The replacement's base takes the state over.
        c.apply("agent-3", Some("triage"), &cp(0, true, vec![], json!({}))).expect("replacement base");
        assert_eq!(c.get("triage").map(Merged::owner), Some("agent-3"));
    }

    #[test]
    fn bad_payloads_are_named() {
        let reason = |v: Value| match parse(&serde_json::to_vec(&v).expect("json"), 1 << 20) {
            Err(Refusal::BadCheckpoint(r)) => r,
            other => panic!("{v}: {other:?}"),
        };
        let ok = || -> Value { serde_json::from_slice(&cp(1, true, vec![], json!({}))).expect("json") };
        let with = |k: &str, v: Value| {
            let mut o = ok();
            o[k] = v;
            o
        };
        assert!(reason(with("schema", json!("baton.checkpoint/2"))).contains("schema must be"));
        assert!(reason(json!({"schema": "baton.checkpoint/2", "other": 1})).contains("schema must be"));
        assert!(reason(with("seq", json!(-1))).contains("not a checkpoint"));
        assert!(reason(with("created_at", json!(-3.0))).contains("created_at"));
        assert!(reason(with("agent", json!(""))).contains("agent"));
        assert!(
            reason(with("items", json!([{"id": "i", "type": "message", "role": "user", "content": []}])))
                .contains("exclude_timestamp=False")
        );
        assert!(
            reason(with("items", json!([{"id": "i", "type": "bogus", "created_at": 1}]))).contains("type")
        );
        assert!(
            reason(with(
                "items",
                json!([{"id": "i", "type": "message", "role": "robot", "content": [], "created_at": 1}])
            ))
            .contains("role")
        );
        assert!(
            reason(with(
                "items",
                json!([{"id": "i", "type": "function_call", "call_id": "c", "created_at": 1}])
            ))
            .contains("items[0].name")
        );
        assert!(reason(with("agent_state", json!({"attempts": [{"outcome": "x"}]}))).contains("attempts"));
        let mut e = entry("c1", "started", None);
        e["rerun"] = json!("sometimes");
        assert!(reason(with("journal", json!([e]))).contains("not a checkpoint"));
        assert!(reason(with("journal", json!([entry("", "started", None)]))).contains("call_id"));
        let mut e = entry("c1", "finished", Some("x"));
        e["output"]["call_id"] = json!("c2");
        assert!(reason(with("journal", json!([e]))).contains("function_call_output item"));
        let mut e = entry("c1", "finished", Some("x"));
        e["output"]["output"] = json!(3);
        assert!(reason(with("journal", json!([e]))).contains("journal[0].output"));
        let mut o = ok();
        o.as_object_mut().map(|o| o.remove("agent_state"));
        assert!(reason(o).contains("a base carries"));
        let mut o = ok();
        o.as_object_mut().map(|o| o.remove("items"));
        assert!(reason(o).contains("not a checkpoint"));

        let big = cp(1, true, vec![msg("u1", "user", &"x".repeat(100), 1.0)], json!({}));
        assert!(matches!(parse(&big, 50), Err(Refusal::BadCheckpoint(r)) if r.contains("limit")));
    }

    #[test]
    fn the_room_cap_refuses_with_buffer_full() {
        let mut c = Checkpoints::new(Limits { max_checkpoint_size: 1 << 20, max_state_bytes: 2000 });
        let small = cp(1, true, vec![msg("u1", "user", "hi", 1.0)], json!({}));
        c.apply("agent-1", Some("triage"), &small).expect("fits");
        let big = cp(2, false, vec![msg("u2", "user", &"x".repeat(3000), 2.0)], json!({}));
        let e = c.apply("agent-1", Some("triage"), &big).expect_err("over the cap");
        assert_eq!((e.reason(), e.code()), ("buffer_full", ErrorCode::BufferFull));
        assert_eq!(c.get("triage").map(|m| m.items().len()), Some(1));
        // Replacing an item in place is charged only the difference.
        let before = c.bytes();
        let same = cp(2, false, vec![msg("u1", "user", "ho", 1.0)], json!({}));
        c.apply("agent-1", Some("triage"), &same).expect("fits");
        assert_eq!(c.bytes(), before);
    }

    #[test]
    fn journal_makes_every_call_appear_exactly_once() {
        let mut c = room();
        let fc = |call: &str, at: f64| {
            json!({"id": format!("fc_{call}"), "type": "function_call", "call_id": call, "name": "issue_refund",
                   "arguments": "{\"amount\":5}", "created_at": at})
        };
        let out = |call: &str| {
            json!({"id": format!("out_{call}"), "type": "function_call_output", "call_id": call,
                   "output": "placeholder", "is_error": false, "created_at": 5.0})
        };
        // c1: finished, call and output in chat. c2: finished, neither in chat (batch not yet
        // committed). c3: running, call in chat with a progress placeholder. c4: running, not in
        // chat. c5: cancelled, call in chat.
        let items = vec![
            msg("u1", "user", "refund please", 1.0),
            fc("c1", 2.0),
            out("c1"),
            fc("c3", 3.0),
            out("c3"),
            fc("c5", 4.0),
        ];
        let journal = json!([
            entry("c1", "finished", Some("done")),
            entry("c2", "finished", Some("ok 2")),
            entry("c3", "started", None),
            entry("c4", "started", None),
            entry("c5", "cancelled", Some("handoff"))
        ]);
        c.apply("agent-1", Some("triage"), &cp(1, true, items, json!({"journal": journal}))).expect("base");
        // The same finished entry sent again in a delta does not duplicate anything.
        let again = cp(2, false, vec![], json!({"journal": [entry("c1", "finished", Some("done"))]}));
        c.apply("agent-1", Some("triage"), &again).expect("delta");
        let b = bundle(&c);
        // c3's placeholder output stays: the chat goes over as merged.
        assert_eq!(
            ids(&b),
            ["u1", "fc_c1", "out_c1", "fc_c3", "out_c3", "fc_c5", "c2_journal_output", "c5_journal_output"]
        );
        let items = b["chat"]["items"].as_array().expect("items");
        assert_eq!(items[6]["output"], "ok 2");
        assert_eq!(items[7]["output"], "handoff");
        assert_eq!(items[7]["is_error"], true);
        let flying: Vec<&str> = b["tool_calls_in_flight"]
            .as_array()
            .expect("list")
            .iter()
            .map(|e| e["call_id"].as_str().expect("id"))
            .collect();
        assert_eq!(flying, ["c3", "c4"]);
        assert_eq!(b["tool_calls_in_flight"][0]["idempotency_key"], "key-c3");
        assert_eq!(b["tool_calls_in_flight"][0]["rerun"], "never");
        assert!(b["tool_calls_in_flight"][0].get("note").is_none(), "a null note is left out");
        assert!(b["tool_calls_in_flight"][0].get("status").is_none());
        for call in ["c1", "c2", "c5"] {
            let n =
                items.iter().filter(|i| i["type"] == "function_call_output" && i["call_id"] == call).count();
            assert_eq!(n, 1, "{call}");
        }
        assert_eq!(b["summary"]["counts"]["function_call_output"], 4);
        // c4 finishes: its output joins the chat once, in journal order.
        let done = cp(3, false, vec![], json!({"journal": [entry("c4", "finished", Some("refunded"))]}));
        c.apply("agent-1", Some("triage"), &done).expect("delta");
        let b = bundle(&c);
        assert_eq!(b["summary"]["counts"]["tool_calls_in_flight"], 1);
        assert_eq!(ids(&b)[6..], ["c2_journal_output", "c4_journal_output", "c5_journal_output"]);
    }

    #[test]
    fn bundle_is_canonical_with_summary_over_the_rest() {
        let mut c = room();
        let items = vec![msg("u1", "user", "Grüße \"quoted\"\n", 1795215801.2498)];
        let st = json!({"user_state": {"z": 1, "account": "A-1001"}, "agent_state": {"outcome": "ok"}});
        c.apply("agent-1", Some("triage"), &cp(1, true, items, st)).expect("base");
        let raw = c.get("triage").expect("state").recovery_bundle(
            "recovery after job_failed",
            Some("r-1"),
            1796049010.5,
        );
        let v: Value = serde_json::from_slice(&raw).expect("json");
        // serde_json keeps objects sorted (no preserve_order), so re-encoding is canonical.
        assert_eq!(serde_json::to_vec(&v).expect("encode"), raw);
        let mut body = v.clone();
        let summary = body.as_object_mut().expect("object").remove("summary").expect("summary");
        let body = serde_json::to_vec(&body).expect("encode");
        assert_eq!(summary["size"], body.len());
        assert_eq!(summary["sha256"], hex::encode(Sha256::digest(&body)));
        assert_eq!(
            summary["counts"],
            json!({"agent_config_update": 0, "agent_handoff": 0, "function_call": 0, "function_call_output": 0,
                   "items": 1, "message": 1, "tool_calls_in_flight": 0})
        );
        assert_eq!(
            (v["cause"].as_str(), v["from_agent"].as_str(), v["to_agent"].as_str()),
            (Some("recovery"), Some("triage"), Some("triage"))
        );
        assert_eq!(v["handoff_id"], "r-1");
        assert_eq!(v["user_state"], json!({"account": "A-1001", "z": 1}));
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        /// One random checkpoint: sender (0, 1: two triage identities; 2: a billing agent), base,
        /// whether `seq` follows the model's last one, items (`(id, kind)`, call ids from a small
        /// set so upserts collide) and journal entries (`(call, status)`).
        type Op = (u8, bool, bool, Vec<(u8, u8)>, Vec<(u8, u8)>);
        /// What the merge should hold: owner, last seq, item ids in order, status per call.
        type Model = (u8, u64, Vec<String>, BTreeMap<String, u8>);

        fn payload(op: &Op, seq: u64) -> Vec<u8> {
            let (_, base, _, items, journal) = op;
            let items: Vec<Value> = items
                .iter()
                .map(|&(n, kind)| match kind {
                    0 => msg(&format!("m{n}"), "user", &format!("text {n}"), f64::from(n)),
                    1 => json!({"id": format!("fc_c{}", n % 4), "type": "function_call", "call_id": format!("c{}", n % 4),
                                "name": "t", "arguments": "{}", "created_at": 1.0}),
                    _ => json!({"id": format!("out_c{}", n % 4), "type": "function_call_output", "call_id": format!("c{}", n % 4),
                                "output": "o", "created_at": 2.0}),
                })
                .collect();
            let journal: Vec<Value> = journal
                .iter()
                .map(|&(n, st)| {
                    entry(
                        &format!("c{}", n % 4),
                        ["started", "finished", "cancelled"][usize::from(st % 3)],
                        Some("x"),
                    )
                })
                .collect();
            cp(seq, *base, items, json!({"journal": journal, "user_state": {"seq": seq}}))
        }

        proptest! {
            #[test]
            fn merge_matches_a_model_and_every_call_is_in_the_bundle_once(
                ops in proptest::collection::vec(
                    (0u8..3, any::<bool>(), any::<bool>(),
                     proptest::collection::vec((0u8..8, 0u8..3), 0..5),
                     proptest::collection::vec((0u8..4, 0u8..3), 0..3)),
                    1..25)
            ) {
                let mut c = room();
                let mut model: Option<Model> = None;
                for op in &ops {
                    let (who, base, follows, items, journal) = op;
                    let seq = match (&model, follows) {
                        (Some((_, last, _, _)), true) => last + 1,
                        _ => 1000,
                    };
                    let (identity, agent) = [("agent-1", "triage"), ("agent-2", "triage"), ("agent-3", "billing")][usize::from(*who)];
                    let result = c.apply(identity, Some(agent), &payload(op, seq));
                    if *who == 2 {
                        prop_assert_eq!(result.map_err(|e| e.reason()), Err("wrong_agent"));
                        continue;
                    }
                    let accept = *base || matches!(&model, Some((owner, last, _, _)) if owner == who && seq == last + 1);
                    prop_assert_eq!(result.is_ok(), accept, "{:?}", result);
                    if !accept {
                        continue;
                    }
                    if *base {
                        model = Some((*who, seq, Vec::new(), BTreeMap::new()));
                    }
                    if let Some((_, last, ids, calls)) = model.as_mut() {
                        *last = seq;
                        for &(n, kind) in items {
                            let id = match kind { 0 => format!("m{n}"), 1 => format!("fc_c{}", n % 4), _ => format!("out_c{}", n % 4) };
                            if !ids.contains(&id) {
                                ids.push(id);
                            }
                        }
                        for &(n, st) in journal {
                            calls.insert(format!("c{}", n % 4), st % 3);
                        }
                    }
                }
                let Some((_, last, ids, calls)) = model else {
                    prop_assert!(c.get("triage").is_none());
                    return Ok(());
                };
                let m = c.get("triage").expect("state");
                prop_assert_eq!(m.last_seq(), last);
                let got: Vec<&str> = m.items().iter().map(|i| i.id.as_str()).collect();
                prop_assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
                let b: Value = serde_json::from_slice(&m.recovery_bundle("r", None, 3.0)).expect("JSON");
                let items = b["chat"]["items"].as_array().expect("items");
                for (call, st) in &calls {
                    let n = items.iter().filter(|i| i["type"] == "function_call_output" && i["call_id"] == call.as_str()).count();
                    let in_chat = ids.contains(&format!("out_{call}"));
                    prop_assert_eq!(n, usize::from(*st != 0 || in_chat), "{}", call);
                }
                let started = calls.values().filter(|&&s| s == 0).count();
                prop_assert_eq!(b["tool_calls_in_flight"].as_array().map(Vec::len), Some(started));
                prop_assert_eq!(b["summary"]["counts"]["items"].as_u64(), Some(items.len() as u64));
            }
        }
    }
}
