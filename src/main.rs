//! The `baton` command line.

mod launch;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use lk_baton::audio::filler::FillerSound;
use lk_baton::coordinator::{Coordinator, CoordinatorConfig};
use lk_baton::observe::{self, Observed, Observer, ObserverConfig, Readiness, WebhookConfig};
use lk_baton::room::{self, RoomEnd, RoomParams, TokenSource};
use tokio::sync::watch;

/// baton: a silent LiveKit participant that passes a live voice call between AI agents.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, env = "BATON_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Subcommand)]
enum Command {
    /// Join one room and stay until interrupted (Ctrl-C / SIGTERM leaves cleanly).
    Join(JoinArgs),
    /// Run as a LiveKit agent worker: register under an agent name and join every room that
    /// dispatches it (RoomAgentDispatch in the room's token, or CreateDispatch), many rooms per
    /// process. Reads configs/baton.toml (or --config); flags beat environment beat the file.
    Worker {
        #[command(flatten)]
        args: lk_baton::config::WorkerArgs,
        #[command(flatten)]
        observe: ObserveArgs,
    },
    /// Make sure a room has its coordinator: create the room if it does not exist, dispatch
    /// baton to it unless baton is already there or on its way, and wait for it to join.
    ///
    /// Use it whenever a room may exist before the caller's token does. LiveKit applies a
    /// token's RoomConfiguration (its agent dispatches) only when that join creates the room,
    /// so a room made earlier (CreateRoom, or another participant first) gets no baton from the
    /// caller's token, and nothing says so. `baton ensure` dispatches baton with CreateDispatch
    /// instead. It is idempotent: it looks for a participant whose attribute `baton.role` is
    /// `coordinator` and for a baton dispatch still under way first, so running it twice
    /// dispatches once. A `baton worker` registered under the agent name must be running.
    ///
    /// Exit status: 0 when baton is in the room (with `--wait 0`: also when it is dispatched);
    /// 1 when the server could not be asked or refused (one `baton: error:` line on stderr);
    /// 3 when baton is dispatched but not in the room after `--wait` seconds (usually: no
    /// worker registered under that agent name, and the server dropped the dispatch).
    #[command(verbatim_doc_comment)]
    Ensure(EnsureArgs),
}

/// Where events, metrics and the timeline page go (docs/events.md). Traces are exported when
/// OTEL_EXPORTER_OTLP_ENDPOINT is set.
#[derive(Args)]
struct ObserveArgs {
    /// Serve /metrics (Prometheus), /healthz, /readyz and the call timeline page (/) on this
    /// address, e.g. 127.0.0.1:9090.
    #[arg(long, env = "BATON_HTTP", value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
    /// POST every event to this URL, signed as LiveKit signs its webhooks (a JWT from the API
    /// key and secret in the Authorization header).
    #[arg(long, env = "BATON_WEBHOOK_URL", value_name = "URL")]
    webhook_url: Option<String>,
}

/// How long an exit waits for queued webhook events and spans.
const OBSERVER_FLUSH: Duration = Duration::from_secs(5);

/// Starts the event sinks and, with --http, the HTTP endpoint.
async fn start_observer(
    args: &ObserveArgs,
    api_key: &str,
    api_secret: &str,
    readiness: Readiness,
) -> anyhow::Result<Arc<Observer>> {
    let webhook = args.webhook_url.clone().map(|url| WebhookConfig {
        url,
        api_key: api_key.to_string(),
        api_secret: api_secret.to_string(),
    });
    let observer = Observer::new(ObserverConfig { stdout: true, webhook, traces_from_env: true, readiness })?;
    if let Some(addr) = args.http {
        observe::http::serve(addr, observer.clone()).await?;
    }
    Ok(observer)
}

#[derive(Args)]
struct Server {
    /// LiveKit server URL (ws://, wss://, http:// or https://).
    #[arg(long, env = "LIVEKIT_URL")]
    url: String,
    /// API key that signs baton's access token and its server API calls.
    #[arg(long, env = "LIVEKIT_API_KEY")]
    api_key: String,
    /// API secret that signs baton's access token and its server API calls.
    #[arg(long, env = "LIVEKIT_API_SECRET", hide_env_values = true)]
    api_secret: String,
}

#[derive(Args)]
struct EnsureArgs {
    #[command(flatten)]
    server: Server,
    /// The room that must have a coordinator.
    #[arg(long, env = "BATON_ROOM")]
    room: String,
    /// The agent name `baton worker` registers under (its `--agent-name`).
    #[arg(long, env = "BATON_AGENT_NAME", default_value = "baton")]
    agent_name: String,
    /// Seconds to wait for baton to join after dispatching it (0: do not wait).
    #[arg(long, default_value_t = 10)]
    wait: u64,
}

#[derive(Args)]
struct JoinArgs {
    #[command(flatten)]
    server: Server,
    /// Room to join (created by the server if it does not exist).
    #[arg(long, env = "BATON_ROOM")]
    room: String,
    /// baton's participant identity; adapters address control messages to it.
    #[arg(long, env = "BATON_IDENTITY", default_value = "baton")]
    identity: String,
    /// Start with the filler track audible (it starts muted; handoffs will drive it).
    #[arg(long)]
    unmuted: bool,
    /// Echo packets on topic `baton.echo` back to their sender: a data-path check for adapters.
    #[arg(long, env = "BATON_ECHO")]
    echo: bool,
    /// Comfort-noise level in dBFS (RMS).
    #[arg(long, env = "BATON_NOISE_DBFS", default_value_t = -45.0, allow_negative_numbers = true)]
    noise_dbfs: f64,
    /// A WAV clip to loop as the filler instead of comfort noise (hold music, "one moment
    /// please"); any rate and channel count, at most 60 s.
    #[arg(long, env = "BATON_FILLER_CLIP", value_name = "WAV")]
    filler_clip: Option<std::path::PathBuf>,
    /// Gain applied to the filler clip, in dB.
    #[arg(long, env = "BATON_FILLER_GAIN_DB", default_value_t = 0.0, allow_negative_numbers = true)]
    filler_gain_db: f64,
    /// Seconds to keep trying to get back into the room after losing the connection.
    #[arg(long, env = "BATON_REJOIN_TIMEOUT", default_value_t = 60)]
    rejoin_timeout: u64,
    /// baton.toml naming the agents to coordinate and the handoff policy. Without it baton
    /// coordinates nobody: it only answers `ping` (and `baton.echo` with --echo).
    #[arg(long, env = "BATON_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    observe: ObserveArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("could not start the async runtime: {e}")),
    };
    // Inside the runtime: the security-log throttle spawns the task that writes its counts.
    let entered = runtime.enter();
    lk_baton::logging::init(&cli.log_format);
    drop(entered);
    let result = runtime.block_on(async {
        match cli.command {
            Command::Join(args) => join(args).await.map(|()| ExitCode::SUCCESS),
            Command::Worker { args, observe } => worker(args, observe).await.map(|()| ExitCode::SUCCESS),
            Command::Ensure(args) => ensure(args).await,
        }
    });
    result.unwrap_or_else(|e| fail(&format!("{e:#}")))
}

fn fail(msg: &str) -> ExitCode {
    use std::io::Write;
    // Not eprintln!: it panics when stderr is a closed pipe, and the exit code says enough.
    let _ = writeln!(std::io::stderr(), "baton: error: {msg}");
    ExitCode::FAILURE
}

async fn join(args: JoinArgs) -> anyhow::Result<()> {
    if args.room.is_empty() {
        anyhow::bail!("--room must not be empty");
    }
    let policy = match &args.config {
        Some(path) => lk_baton::config::load(Some(path))?
            .file
            .to_policy()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        None => baton_floor::Policy::default(),
    };
    let api = lk_baton::server_api::ServerApi::new(
        &args.server.url,
        &args.server.api_key,
        &args.server.api_secret,
    )?;
    let observer =
        start_observer(&args.observe, &args.server.api_key, &args.server.api_secret, Readiness::InRoom)
            .await?;
    let cfg = CoordinatorConfig {
        room: args.room.clone(),
        policy,
        api: Some(Arc::new(api)),
        echo: args.echo,
        trace_context: observer.exports_traces(),
    };
    let coordinator = Box::new(Coordinator::new(cfg, std::time::Instant::now())?);
    let handler = Box::new(Observed::new(coordinator, observer.clone(), &args.room));
    let filler = FillerSound::configured(args.filler_clip.as_deref(), args.filler_gain_db, args.noise_dbfs)?;
    tracing::info!(filler = %filler.description, "filler ready");
    let params = RoomParams {
        url: args.server.url,
        token: TokenSource::Mint {
            api_key: args.server.api_key,
            api_secret: args.server.api_secret,
            room: args.room.clone(),
            identity: args.identity,
        },
        start_unmuted: args.unmuted,
        filler,
        rejoin_deadline: Duration::from_secs(args.rejoin_timeout),
        drop_signal: Arc::new(tokio::sync::Notify::new()),
    };
    watch_fault_signal(params.drop_signal.clone());
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_termination().await;
        tracing::info!("termination signal received");
        let _ = tx.send(true);
    });
    let end = room::run(params, handler, rx).await;
    observer.shutdown(OBSERVER_FLUSH).await;
    match end? {
        RoomEnd::Left => Ok(()),
        RoomEnd::Removed(why) => {
            tracing::info!(reason = %why, "removed from the room");
            Ok(())
        }
    }
}

/// SIGUSR1 drops the signal connection (baton then resumes): a way to rehearse a network blip.
fn watch_fault_signal(drop_signal: Arc<tokio::sync::Notify>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut usr1) = signal(SignalKind::user_defined1()) {
            tokio::spawn(async move {
                while usr1.recv().await.is_some() {
                    tracing::warn!("SIGUSR1: dropping the signal connection to rehearse a resume");
                    drop_signal.notify_one();
                }
            });
        }
    }
}

async fn wait_for_termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Exit status of `baton ensure` when baton was dispatched but did not join in time.
const NOT_IN_ROOM: u8 = 3;

async fn ensure(args: EnsureArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    if args.room.is_empty() {
        anyhow::bail!("--room must not be empty");
    }
    let say = |line: &str| {
        // Not println!: it panics when stdout is a closed pipe.
        let _ = writeln!(std::io::stdout(), "baton ensure: {line}");
    };
    let s = &args.server;
    let wait = Duration::from_secs(args.wait);
    match launch::ensure(&s.url, &s.api_key, &s.api_secret, &args.room, &args.agent_name, wait, say).await? {
        launch::Outcome::InRoom { .. } => Ok(ExitCode::SUCCESS),
        launch::Outcome::NotYetInRoom { .. } if args.wait == 0 => Ok(ExitCode::SUCCESS),
        launch::Outcome::NotYetInRoom { dispatch_id } => {
            let _ = writeln!(
                std::io::stderr(),
                "baton: baton was dispatched to room `{}` (dispatch {dispatch_id}) but is not in it after {} s; \
                 is a `baton worker` running with agent name `{}` on this server? The server drops a \
                 dispatch it cannot assign, and `baton ensure` dispatches again once it is {} s old",
                args.room,
                args.wait,
                args.agent_name,
                launch::UNASSIGNED_DISPATCH_STALE.as_secs(),
            );
            Ok(ExitCode::from(NOT_IN_ROOM))
        }
    }
}

async fn worker(args: lk_baton::config::WorkerArgs, observe: ObserveArgs) -> anyhow::Result<()> {
    let loaded = lk_baton::config::load(args.config.as_deref())?;
    let opts = lk_baton::config::resolve(&args, &loaded)?;
    let observer = start_observer(&observe, &opts.api_key, &opts.api_secret, Readiness::Registered).await?;
    if let Some(path) = &loaded.path {
        tracing::info!(config = %path.display(), agents = opts.policy.agents.len(), "configuration loaded");
    }
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_termination().await;
        tracing::info!("termination signal received");
        let _ = tx.send(true);
    });
    let result = lk_baton::worker::run(opts, observer.clone(), rx).await;
    observer.shutdown(OBSERVER_FLUSH).await;
    Ok(result?)
}
