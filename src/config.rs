//! `configs/baton.toml` and the `baton worker` options.
//!
//! Precedence, highest first: command-line flags, environment (`LIVEKIT_URL`,
//! `LIVEKIT_API_KEY`, `LIVEKIT_API_SECRET`, `BATON_*`), the config file, built-in defaults.
//! clap already merges flags over environment into [`WorkerArgs`] (every field optional, no
//! clap defaults, so "not given" is visible); [`resolve`] then falls back to the file and the
//! defaults. The file is parsed strictly: an unknown key is an error, not a silent typo.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_floor::{Policy, ReleasePolicy, Retry, Standby, StandbyFrom};
use serde::Deserialize;

use crate::worker::{StateConfig, WorkerOptions};

/// Where the config file is looked for when `--config` / `BATON_CONFIG` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "configs/baton.toml";

/// `baton worker` flags (each also read from the environment variable shown in `--help`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WorkerArgs {
    /// LiveKit server URL (ws://, wss://, http:// or https://). [file: server.url]
    #[arg(long, env = "LIVEKIT_URL")]
    pub url: Option<String>,
    /// API key: signs the worker's registration and the server API calls. [file: server.api_key]
    #[arg(long, env = "LIVEKIT_API_KEY")]
    pub api_key: Option<String>,
    /// API secret paired with the key. Prefer the environment to a file for it. [file: server.api_secret]
    #[arg(long, env = "LIVEKIT_API_SECRET", hide_env_values = true)]
    pub api_secret: Option<String>,
    /// Config file (agents, handoff policy, worker settings). Without this flag,
    /// configs/baton.toml is read if it exists; a file named here must exist.
    #[arg(long, env = "BATON_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Agent name to register under; rooms get a baton when their token's RoomConfiguration
    /// (or a CreateDispatch) names it. [file: worker.agent_name; default: baton]
    #[arg(long, env = "BATON_AGENT_NAME")]
    pub agent_name: Option<String>,
    /// Most rooms held at once; further jobs are declined so the server picks another worker.
    /// [file: worker.max_rooms; default: 200]
    #[arg(long, env = "BATON_MAX_ROOMS")]
    pub max_rooms: Option<usize>,
    /// baton's participant identity in each room. [file: worker.identity; default: baton]
    #[arg(long, env = "BATON_IDENTITY")]
    pub identity: Option<String>,
    /// Comfort-noise level of the filler track, in dBFS (RMS). [file: worker.noise_dbfs; default: -45]
    #[arg(long, env = "BATON_NOISE_DBFS", allow_negative_numbers = true)]
    pub noise_dbfs: Option<f64>,
    /// A WAV clip to loop as the filler instead of comfort noise (hold music, "one moment
    /// please"): any rate and channel count, at most 60 s, encoded once at start.
    /// [file: worker.filler_clip, relative to the file; default: none]
    #[arg(long, env = "BATON_FILLER_CLIP", value_name = "WAV")]
    pub filler_clip: Option<PathBuf>,
    /// Gain applied to the filler clip, in dB. [file: worker.filler_gain_db; default: 0]
    #[arg(long, env = "BATON_FILLER_GAIN_DB", allow_negative_numbers = true)]
    pub filler_gain_db: Option<f64>,
    /// Seconds a room keeps trying to get back in after losing its connection.
    /// [file: worker.rejoin_timeout; default: 60]
    #[arg(long, env = "BATON_REJOIN_TIMEOUT", value_name = "SECONDS")]
    pub rejoin_timeout: Option<f64>,
    /// Directory of the embedded room-state store (a redb file, `state.redb`), so a restarted
    /// worker recovers its rooms. [file: store.path; default: .baton-state]
    #[arg(long, env = "BATON_STORE_PATH", value_name = "DIR")]
    pub store_path: Option<PathBuf>,
    /// Redis URL of a room-state store shared by many workers (`redis://host:6379/0`); replaces
    /// the embedded store. [file: store.url]
    #[arg(long, env = "BATON_STORE_URL", value_name = "URL")]
    pub store_url: Option<String>,
}

/// Why the configuration cannot be used. Every message names the file (and line) or the option.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}:{line}:{column}: {reason}")]
    Invalid { path: PathBuf, line: usize, column: usize, reason: String },
    #[error("{path}: {reason}")]
    Policy { path: String, reason: String },
    #[error("{0} is required: pass {1}")]
    Missing(&'static str, &'static str),
    #[error("{0}")]
    Value(String),
}

/// A duration written as seconds (`8`, `0.4`) or with a unit (`"400ms"`, `"8s"`, `"2m"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secs(pub Duration);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Float(f64),
            Text(String),
        }
        let seconds = |s: f64| {
            Duration::try_from_secs_f64(s)
                .map(Secs)
                .map_err(|_| serde::de::Error::custom(format!("{s} is not a usable number of seconds")))
        };
        match Raw::deserialize(d)? {
            Raw::Int(i) => seconds(i as f64),
            Raw::Float(f) => seconds(f),
            Raw::Text(t) => parse_duration(&t).map(Secs).map_err(serde::de::Error::custom),
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (write 8, 0.5, \"400ms\", \"8s\" or \"2m\")"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" | "" => 1.0,
        "m" | "min" => 60.0,
        other => {
            return Err(format!("unknown unit `{other}` in `{text}` (use ms, s or m)"));
        }
    };
    Duration::try_from_secs_f64(n * scale).map_err(|_| format!("`{text}` is out of range"))
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub worker: WorkerSection,
    #[serde(default)]
    pub agents: Vec<AgentEntry>,
    #[serde(default)]
    pub handoff: HandoffSection,
    #[serde(default)]
    pub recovery: RecoverySection,
    #[serde(default)]
    pub store: StoreSection,
}

/// `[store]`: where room state is kept (issue 14).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `embedded` (default), `redis` (implied by `url`) or `memory` (nothing durable).
    pub kind: Option<String>,
    /// Directory of the embedded store, relative to the config file.
    pub path: Option<PathBuf>,
    /// Redis URL.
    pub url: Option<String>,
    /// Most bytes stored per room.
    pub room_bytes: Option<u64>,
    /// How long a room's state outlives its last write.
    pub ttl: Option<Secs>,
    /// How long a baton's lease on a room lasts without renewal: after a crash, another baton
    /// may take the room over once it lapses.
    pub lease_ttl: Option<Secs>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub url: Option<String>,
    pub api_key: Option<String>,
    pub api_secret: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    pub agent_name: Option<String>,
    pub max_rooms: Option<usize>,
    pub identity: Option<String>,
    pub noise_dbfs: Option<f64>,
    pub filler_clip: Option<PathBuf>,
    pub filler_gain_db: Option<f64>,
    pub rejoin_timeout: Option<Secs>,
    pub status_interval: Option<Secs>,
    pub ping_interval: Option<Secs>,
    pub ping_timeout: Option<Secs>,
    pub reconnect_initial: Option<Secs>,
    pub reconnect_max: Option<Secs>,
    pub drain_timeout: Option<Secs>,
}

/// One agent baton coordinates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// The agent's LiveKit agent name (what its worker registers as).
    pub name: toml::Spanned<String>,
    /// What the agent does (`triage`, `billing`, ...), for adapters and logs.
    pub role: Option<String>,
    /// This agent is dispatched when the call starts.
    #[serde(default)]
    pub start: bool,
    /// Agents to try, in order, when this one cannot take the call.
    pub alternate: Option<OneOrMany>,
    /// Idle instances kept in the room as muted standbys ([`baton_floor::Standby`]).
    #[serde(default)]
    pub standby: u32,
    /// From when they are kept: `start` (default) or `hint`.
    pub standby_from: Option<baton_floor::StandbyFrom>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySection {
    pub attempts: Option<u32>,
    pub backoff_initial: Option<Secs>,
    pub backoff_max: Option<Secs>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Release {
    Leave,
    Standby,
}

/// `[handoff]`: the floor arbiter's knobs; names are those of [`baton_floor::Policy`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffSection {
    pub source_quiet_timeout: Option<Secs>,
    pub sentence_timeout: Option<Secs>,
    pub silence_grace: Option<Secs>,
    pub bundle_timeout: Option<Secs>,
    pub join_timeout: Option<Secs>,
    pub ready_timeout: Option<Secs>,
    pub rejoin_grace: Option<Secs>,
    pub stall_timeout: Option<Secs>,
    pub max_transfer_time: Option<Secs>,
    pub max_filler: Option<Secs>,
    pub filler_fade: Option<Secs>,
    pub filler_hold: Option<Secs>,
    pub filler_tail: Option<Secs>,
    pub quiet_settle: Option<Secs>,
    pub audible_timeout: Option<Secs>,
    pub start_dispatch: Option<RetrySection>,
    pub handoff_dispatch: Option<RetrySection>,
    pub release: Option<Release>,
    pub release_grace: Option<Secs>,
    pub hint_timeout: Option<Secs>,
    pub hint_interval: Option<Secs>,
}

/// `[recovery]`: crash detection and replacement; names are those of [`baton_floor::Policy`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverySection {
    pub crash_suspect_after: Option<Secs>,
    pub crash_confirm_after: Option<Secs>,
    pub recovery_attempts: Option<u32>,
    pub recovery_timeout: Option<Secs>,
    pub recovery_greeting: Option<bool>,
}

/// A parsed config file and where it came from (for error messages).
#[derive(Debug, Clone, Default)]
pub struct LoadedConfig {
    pub path: Option<PathBuf>,
    pub text: String,
    pub file: FileConfig,
}

/// Parses config text; errors carry `path:line:column`.
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ConfigError::Invalid { path: path.to_path_buf(), line, column, reason: e.message().to_string() }
    })?;
    check_agents(path, text, &file)?;
    Ok(file)
}

/// Reads the config file: the one named (which must exist), else the default path if present.
pub fn load(explicit: Option<&Path>) -> Result<LoadedConfig, ConfigError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let p = PathBuf::from(DEFAULT_CONFIG_PATH);
            if !p.exists() {
                return Ok(LoadedConfig::default());
            }
            p
        }
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ConfigError::Read { path: path.clone(), reason: e.to_string() })?;
    let file = parse(&path, &text)?;
    Ok(LoadedConfig { path: Some(path), text, file })
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

fn check_agents(path: &Path, text: &str, file: &FileConfig) -> Result<(), ConfigError> {
    let at = |span: std::ops::Range<usize>, reason: String| {
        let (line, column) = line_col(text, span.start);
        ConfigError::Invalid { path: path.to_path_buf(), line, column, reason }
    };
    let mut seen = BTreeSet::new();
    let mut starter: Option<&str> = None;
    for a in &file.agents {
        let name = a.name.get_ref();
        if name.trim().is_empty() {
            return Err(at(a.name.span(), "agent name must not be empty".into()));
        }
        if !seen.insert(name.as_str()) {
            return Err(at(a.name.span(), format!("agent `{name}` is listed twice")));
        }
        if a.start {
            if let Some(first) = starter {
                return Err(at(
                    a.name.span(),
                    format!("both `{first}` and `{name}` have start = true; only one agent starts the call"),
                ));
            }
            starter = Some(name);
        }
    }
    for a in &file.agents {
        for alt in a.alternate.as_ref().map(OneOrMany::to_vec).unwrap_or_default() {
            if !seen.contains(alt.as_str()) {
                return Err(at(
                    a.name.span(),
                    format!(
                        "agent `{}` names alternate `{alt}`, which is not in [[agents]]",
                        a.name.get_ref()
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl FileConfig {
    /// The floor arbiter's policy: the file's values over [`Policy::default`], then validated.
    pub fn to_policy(&self) -> Result<Policy, baton_floor::PolicyError> {
        let d = Policy::default();
        let h = &self.handoff;
        let r = &self.recovery;
        let dur = |v: Option<Secs>, default: Duration| v.map_or(default, |s| s.0);
        let retry = |r: &Option<RetrySection>, default: Retry| match r {
            None => default,
            Some(r) => Retry {
                attempts: r.attempts.unwrap_or(default.attempts),
                backoff_initial: dur(r.backoff_initial, default.backoff_initial),
                backoff_max: dur(r.backoff_max, default.backoff_max),
            },
        };
        let policy = Policy {
            agents: self.agents.iter().map(|a| a.name.get_ref().clone()).collect(),
            starting_agent: self.agents.iter().find(|a| a.start).map(|a| a.name.get_ref().clone()),
            alternates: self
                .agents
                .iter()
                .filter_map(|a| a.alternate.as_ref().map(|alt| (a.name.get_ref().clone(), alt.to_vec())))
                .collect::<BTreeMap<_, _>>(),
            source_quiet_timeout: dur(h.source_quiet_timeout, d.source_quiet_timeout),
            sentence_timeout: dur(h.sentence_timeout, d.sentence_timeout),
            silence_grace: dur(h.silence_grace, d.silence_grace),
            bundle_timeout: dur(h.bundle_timeout, d.bundle_timeout),
            join_timeout: dur(h.join_timeout, d.join_timeout),
            ready_timeout: dur(h.ready_timeout, d.ready_timeout),
            rejoin_grace: dur(h.rejoin_grace, d.rejoin_grace),
            stall_timeout: dur(h.stall_timeout, d.stall_timeout),
            max_transfer_time: dur(h.max_transfer_time, d.max_transfer_time),
            max_filler: dur(h.max_filler, d.max_filler),
            filler_fade: dur(h.filler_fade, d.filler_fade),
            filler_hold: dur(h.filler_hold, d.filler_hold),
            filler_tail: dur(h.filler_tail, d.filler_tail),
            quiet_settle: dur(h.quiet_settle, d.quiet_settle),
            audible_timeout: dur(h.audible_timeout, d.audible_timeout),
            start_dispatch: retry(&h.start_dispatch, d.start_dispatch),
            handoff_dispatch: retry(&h.handoff_dispatch, d.handoff_dispatch),
            release: match h.release {
                None => d.release,
                Some(Release::Leave) => ReleasePolicy::Leave,
                Some(Release::Standby) => ReleasePolicy::Standby,
            },
            release_grace: dur(h.release_grace, d.release_grace),
            crash_suspect_after: dur(r.crash_suspect_after, d.crash_suspect_after),
            crash_confirm_after: dur(r.crash_confirm_after, d.crash_confirm_after),
            recovery_attempts: r.recovery_attempts.unwrap_or(d.recovery_attempts),
            recovery_timeout: dur(r.recovery_timeout, d.recovery_timeout),
            recovery_greeting: r.recovery_greeting.unwrap_or(d.recovery_greeting),
            standby: self
                .agents
                .iter()
                .filter(|a| a.standby > 0 || a.standby_from == Some(StandbyFrom::Hint))
                .map(|a| {
                    let from = a.standby_from.unwrap_or_default();
                    (a.name.get_ref().clone(), Standby { count: a.standby, from })
                })
                .collect(),
            hint_timeout: dur(h.hint_timeout, d.hint_timeout),
            hint_interval: dur(h.hint_interval, d.hint_interval),
        };
        policy.validate()?;
        Ok(policy)
    }
}

/// Merges flags/environment (`args`) over the file over the defaults.
pub fn resolve(args: &WorkerArgs, loaded: &LoadedConfig) -> Result<WorkerOptions, ConfigError> {
    let f = &loaded.file;
    let w = &f.worker;
    let pick = |flag: &Option<String>, file: &Option<String>| {
        flag.clone().or_else(|| file.clone()).filter(|s| !s.is_empty())
    };
    let url = pick(&args.url, &f.server.url)
        .ok_or(ConfigError::Missing("the server URL", "--url, LIVEKIT_URL or server.url"))?;
    let api_key = pick(&args.api_key, &f.server.api_key)
        .ok_or(ConfigError::Missing("the API key", "--api-key, LIVEKIT_API_KEY or server.api_key"))?;
    let api_secret = pick(&args.api_secret, &f.server.api_secret).ok_or(ConfigError::Missing(
        "the API secret",
        "--api-secret, LIVEKIT_API_SECRET or server.api_secret",
    ))?;
    let defaults = StateConfig::default();
    let secs = |v: Option<Secs>, default: Duration| v.map_or(default, |s| s.0);
    let rejoin_timeout = match args.rejoin_timeout {
        Some(s) => Duration::try_from_secs_f64(s).map_err(|_| {
            ConfigError::Value(format!("--rejoin-timeout {s} is not a usable number of seconds"))
        })?,
        None => secs(w.rejoin_timeout, Duration::from_secs(60)),
    };
    let protocol = StateConfig {
        agent_name: pick(&args.agent_name, &w.agent_name).unwrap_or(defaults.agent_name),
        version: defaults.version,
        max_rooms: args.max_rooms.or(w.max_rooms).unwrap_or(defaults.max_rooms),
        identity: pick(&args.identity, &w.identity).unwrap_or(defaults.identity),
        status_interval: secs(w.status_interval, defaults.status_interval),
        ping_interval: secs(w.ping_interval, defaults.ping_interval),
        ping_timeout: secs(w.ping_timeout, defaults.ping_timeout),
        register_timeout: defaults.register_timeout,
        assignment_timeout: defaults.assignment_timeout,
    };
    if protocol.max_rooms == 0 {
        return Err(ConfigError::Value("max_rooms must be at least 1".into()));
    }
    if protocol.ping_interval.is_zero()
        || protocol.status_interval.is_zero()
        || protocol.ping_timeout <= protocol.ping_interval
    {
        return Err(ConfigError::Value(
            "worker timers: ping_interval and status_interval must be > 0 and ping_timeout > ping_interval"
                .into(),
        ));
    }
    let policy = f.to_policy().map_err(|e| ConfigError::Policy {
        path: loaded.path.as_ref().map_or_else(|| "configuration".into(), |p| p.display().to_string()),
        reason: e.to_string(),
    })?;
    Ok(WorkerOptions {
        url,
        api_key,
        api_secret,
        protocol,
        rejoin_timeout,
        noise_dbfs: args.noise_dbfs.or(w.noise_dbfs).unwrap_or(-45.0),
        // A relative clip path in the file is relative to the file, not to where baton runs.
        filler_clip: args.filler_clip.clone().or_else(|| {
            let clip = w.filler_clip.clone()?;
            let base = loaded.path.as_ref().and_then(|p| p.parent()).filter(|_| clip.is_relative());
            Some(base.map_or_else(|| clip.clone(), |b| b.join(&clip)))
        }),
        filler_gain_db: args.filler_gain_db.or(w.filler_gain_db).unwrap_or(0.0),
        reconnect_initial: secs(w.reconnect_initial, Duration::from_millis(500)),
        reconnect_max: secs(w.reconnect_max, Duration::from_secs(15)),
        drain_timeout: secs(w.drain_timeout, Duration::from_secs(10)),
        policy,
        store: store_config(args, loaded)?,
        lease_ttl: secs(f.store.lease_ttl, DEFAULT_LEASE_TTL),
    })
}

/// Default `[store] lease_ttl`: short, because a crashed baton's rooms wait this long at most for
/// a successor (the issue's goal is a baton back within 3 s of a kill); renewed every third of
/// it, which leaves a baton more than a second of store trouble before it loses its rooms.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(2);

/// `[store]` and `--store-path` / `--store-url`.
fn store_config(args: &WorkerArgs, loaded: &LoadedConfig) -> Result<crate::store::StoreConfig, ConfigError> {
    use crate::store::{DEFAULT_ROOM_BYTES, DEFAULT_TTL, StoreConfig};
    let s = &loaded.file.store;
    let room_bytes = s.room_bytes.unwrap_or(DEFAULT_ROOM_BYTES);
    let ttl = s.ttl.map_or(DEFAULT_TTL, |t| t.0);
    let url = args.store_url.clone().or_else(|| s.url.clone()).filter(|u| !u.is_empty());
    let kind = match (s.kind.as_deref(), &url, &args.store_path) {
        (_, Some(_), _) => "redis",
        (_, None, Some(_)) => "embedded",
        (Some(k), None, None) => k,
        (None, None, None) => "embedded",
    };
    match kind {
        "memory" => Ok(StoreConfig::Memory),
        "redis" => match url {
            Some(url) => Ok(StoreConfig::Redis { url, room_bytes, ttl }),
            None => {
                Err(ConfigError::Value("[store] kind = \"redis\" needs url = \"redis://host:port\"".into()))
            }
        },
        "embedded" => {
            let dir = args.store_path.clone().unwrap_or_else(|| {
                let dir = s.path.clone().unwrap_or_else(|| PathBuf::from(".baton-state"));
                let base = loaded.path.as_ref().and_then(|p| p.parent()).filter(|_| dir.is_relative());
                base.map_or_else(|| dir.clone(), |b| b.join(&dir))
            });
            Ok(StoreConfig::Embedded { dir, room_bytes, ttl })
        }
        other => Err(ConfigError::Value(format!(
            "[store] kind = {other:?}: use \"embedded\", \"redis\" or \"memory\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("configs/test.toml")
    }

    fn invalid(text: &str) -> (usize, usize, String) {
        match parse(p(), text) {
            Err(ConfigError::Invalid { line, column, reason, path }) => {
                assert_eq!(path, p());
                (line, column, reason)
            }
            other => panic!("expected an invalid-file error, got {other:?}"),
        }
    }

    #[test]
    fn line_col_counts_from_one() {
        let t = "a\nbc\nd";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 2));
        assert_eq!(line_col(t, 5), (3, 1));
        assert_eq!(line_col(t, 999), (3, 2));
    }

    #[test]
    fn unknown_key_is_rejected_with_its_line() {
        let (line, _, reason) = invalid("[worker]\nagent_name = \"b\"\nmax_roms = 3\n");
        assert_eq!(line, 3);
        assert!(reason.contains("max_roms"), "{reason}");
    }

    #[test]
    fn wrong_type_and_bad_duration_and_bad_release_have_lines() {
        let (line, col, _) = invalid("[worker]\n\nmax_rooms = \"many\"\n");
        assert_eq!((line, col), (3, 13));
        let (line, _, reason) = invalid("[handoff]\njoin_timeout = \"8 parsecs\"\n");
        assert_eq!(line, 2);
        assert!(reason.contains("parsecs"), "{reason}");
        let (line, _, reason) = invalid("[handoff]\nsilence_grace = \"400ms\"\nrelease = \"vanish\"\n");
        assert_eq!(line, 3);
        assert!(reason.contains("vanish") || reason.contains("variant"), "{reason}");
        let (line, _, _) = invalid("[worker\n");
        assert_eq!(line, 1);
    }

    #[test]
    fn agent_rules_point_at_the_agent() {
        let text =
            "[[agents]]\nname = \"triage\"\nstart = true\n\n[[agents]]\nname = \"billing\"\nstart = true\n";
        let (line, _, reason) = invalid(text);
        assert_eq!(line, 6);
        assert!(reason.contains("only one agent starts"), "{reason}");
        let (line, _, reason) = invalid("[[agents]]\nname = \"a\"\n[[agents]]\nname = \"a\"\n");
        assert_eq!(line, 4);
        assert!(reason.contains("twice"));
        let (line, _, reason) = invalid("[[agents]]\nname = \"a\"\nalternate = \"ghost\"\n");
        assert_eq!(line, 2);
        assert!(reason.contains("ghost"));
    }

    #[test]
    fn shipped_config_parses_and_maps_onto_the_policy() {
        let text = include_str!("../configs/baton.toml");
        let file = parse(Path::new("configs/baton.toml"), text).expect("shipped config is valid");
        let policy = file.to_policy().expect("valid policy");
        assert_eq!(policy.starting_agent.as_deref(), Some("triage"));
        assert!(policy.agents.contains("billing"));
        // The shipped file states the defaults; it must agree with the arbiter's own.
        let d = Policy::default();
        assert_eq!(policy.join_timeout, d.join_timeout);
        assert_eq!(policy.silence_grace, d.silence_grace);
        assert_eq!(policy.start_dispatch, d.start_dispatch);
        assert_eq!(policy.handoff_dispatch, d.handoff_dispatch);
        assert_eq!(policy.release, d.release);
        assert_eq!(policy.release_grace, d.release_grace);
        assert_eq!(policy.max_filler, d.max_filler);
        assert_eq!(policy.rejoin_grace, d.rejoin_grace);
        assert_eq!(policy.stall_timeout, d.stall_timeout);
        assert_eq!(policy.max_transfer_time, d.max_transfer_time);
        assert_eq!(policy.bundle_timeout, d.bundle_timeout);
        assert_eq!(policy.ready_timeout, d.ready_timeout);
        assert_eq!(policy.filler_fade, d.filler_fade);
        assert_eq!(policy.filler_hold, d.filler_hold);
        assert_eq!(policy.filler_tail, d.filler_tail);
        assert_eq!(policy.crash_suspect_after, d.crash_suspect_after);
        assert_eq!(policy.crash_confirm_after, d.crash_confirm_after);
        assert_eq!(policy.recovery_attempts, d.recovery_attempts);
        assert_eq!(policy.recovery_timeout, d.recovery_timeout);
        assert_eq!(policy.recovery_greeting, d.recovery_greeting);
        // And the section is checked like the others.
        let bad = format!("{text}\ncrash_suspect_afterr = 1\n");
        assert!(parse(Path::new("configs/baton.toml"), &bad).is_err(), "unknown [recovery] key accepted");
    }

    #[test]
    fn policy_values_and_alternates_map() {
        let text = r#"
[[agents]]
name = "triage"
start = true
[[agents]]
name = "billing"
alternate = ["billing-backup"]
standby = 1
[[agents]]
name = "billing-backup"
standby = 2
standby_from = "hint"
[handoff]
join_timeout = 3
silence_grace = "250ms"
release = "standby"
hint_timeout = "12s"
[handoff.start_dispatch]
attempts = 5
"#;
        let policy = parse(p(), text).expect("parse").to_policy().expect("policy");
        assert_eq!(policy.join_timeout, Duration::from_secs(3));
        assert_eq!(policy.silence_grace, Duration::from_millis(250));
        assert_eq!(policy.release, ReleasePolicy::Standby);
        assert_eq!(policy.start_dispatch.attempts, 5);
        assert_eq!(policy.start_dispatch.backoff_max, Policy::default().start_dispatch.backoff_max);
        assert_eq!(policy.alternates.get("billing"), Some(&vec!["billing-backup".to_string()]));
        assert_eq!(policy.standby.get("billing"), Some(&Standby { count: 1, from: StandbyFrom::Start }));
        assert_eq!(
            policy.standby.get("billing-backup"),
            Some(&Standby { count: 2, from: StandbyFrom::Hint })
        );
        assert_eq!(policy.standby.get("triage"), None, "no standby unless asked for");
        assert_eq!(policy.hint_timeout, Duration::from_secs(12));
        assert_eq!(policy.hint_interval, Policy::default().hint_interval);
        let bad = text.replace("\"hint\"", "\"later\"");
        assert!(parse(p(), &bad).is_err(), "unknown standby_from accepted");
        let many = text.replace("standby = 2", "standby = 9");
        assert!(parse(p(), &many).expect("parse").to_policy().is_err(), "standby beyond the limit accepted");
        let zero = parse(p(), "[handoff]\nready_timeout = 0\n").expect("parse").to_policy();
        assert!(zero.is_err());
    }

    fn loaded(text: &str) -> LoadedConfig {
        LoadedConfig { path: Some(p().into()), text: text.into(), file: parse(p(), text).expect("parse") }
    }

    #[test]
    fn flags_beat_file_beats_defaults() {
        let file = loaded(
            "[server]\nurl = \"ws://file:7880\"\napi_key = \"k\"\napi_secret = \"s\"\n[worker]\nagent_name = \"from-file\"\nmax_rooms = 7\nrejoin_timeout = \"30s\"\n",
        );
        let args = WorkerArgs { agent_name: Some("from-flag".into()), ..Default::default() };
        let o = resolve(&args, &file).expect("resolve");
        assert_eq!(o.protocol.agent_name, "from-flag");
        assert_eq!(o.protocol.max_rooms, 7);
        assert_eq!(o.url, "ws://file:7880");
        assert_eq!(o.rejoin_timeout, Duration::from_secs(30));
        assert_eq!(o.protocol.identity, "baton");
        assert!((o.noise_dbfs + 45.0).abs() < f64::EPSILON);
        let none = resolve(&WorkerArgs::default(), &LoadedConfig::default());
        assert!(matches!(none, Err(ConfigError::Missing(..))));
    }

    #[test]
    fn filler_clip_in_the_file_is_relative_to_the_file_and_a_flag_wins() {
        let mut file = loaded(
            "[server]\nurl = \"ws://h:7880\"\napi_key = \"k\"\napi_secret = \"s\"\n[worker]\nfiller_clip = \"hold.wav\"\nfiller_gain_db = -6.0\n",
        );
        file.path = Some(PathBuf::from("/etc/baton/baton.toml"));
        let o = resolve(&WorkerArgs::default(), &file).expect("resolve");
        assert_eq!(o.filler_clip, Some(PathBuf::from("/etc/baton/hold.wav")));
        assert!((o.filler_gain_db + 6.0).abs() < f64::EPSILON);
        let args = WorkerArgs { filler_clip: Some("mine.wav".into()), ..Default::default() };
        assert_eq!(resolve(&args, &file).expect("resolve").filler_clip, Some(PathBuf::from("mine.wav")));
    }

    /// clap is what puts flags over environment; check it does with these args.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerArgs,
    }

    #[test]
    fn environment_sits_between_flags_and_file() {
        use clap::Parser;
        // The only test in this crate that touches these variables, so it cannot race another.
        // SAFETY: no other thread of this test binary reads or writes them.
        unsafe {
            std::env::set_var("BATON_MAX_ROOMS", "11");
            std::env::set_var("BATON_AGENT_NAME", "from-env");
        }
        let cli = Cli::try_parse_from(["baton", "--agent-name", "from-flag"]).expect("parse");
        unsafe {
            std::env::remove_var("BATON_MAX_ROOMS");
            std::env::remove_var("BATON_AGENT_NAME");
        }
        let file = loaded(
            "[server]\nurl = \"ws://f\"\napi_key = \"k\"\napi_secret = \"s\"\n[worker]\nmax_rooms = 7\nagent_name = \"from-file\"\nidentity = \"coord\"\n",
        );
        let o = resolve(&cli.worker, &file).expect("resolve");
        assert_eq!(o.protocol.agent_name, "from-flag");
        assert_eq!(o.protocol.max_rooms, 11);
        assert_eq!(o.protocol.identity, "coord");
    }
}
