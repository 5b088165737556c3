//! `server_api` against a real `livekit-server` (the pinned binary `scripts/setup` installs into
//! `.tools/bin`), on free ports: dispatch create/list/delete, server-side mute and unmute of
//! baton's own track, and the errors a caller sees.

use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lk_baton::audio::filler::FillerSound;
use lk_baton::coordinator::Coordinator;
use lk_baton::room::{self, RoomParams, TokenSource};
use lk_baton::server_api::{ApiError, ServerApi};
use tokio::sync::watch;

const KEY: &str = "devkey";
const SECRET: &str = "baton-dev-secret-0123456789abcdef0123456789";

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free tcp port")
}

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).expect("free udp port")
}

fn start_server() -> Server {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join(".tools/bin/livekit-server");
    assert!(bin.exists(), "{} missing: run ./scripts/setup", bin.display());
    let port = free_tcp();
    let child = Command::new(bin)
        .arg("--config")
        .arg(root.join("configs/livekit.yaml"))
        .args(["--port", &port.to_string(), "--udp-port", &free_udp().to_string()])
        .args(["--rtc.tcp_port", &free_tcp().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start livekit-server");
    let server = Server { child, url: format!("ws://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "livekit-server did not listen within 20s");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

#[tokio::test]
async fn dispatch_create_list_delete() {
    let server = start_server();
    let api = ServerApi::new(&server.url, KEY, SECRET).expect("api");
    assert!(api.url().starts_with("http://"));
    let room = "dispatch-room";
    let d = api.create_dispatch(room, "triage", r#"{"baton":"s1"}"#).await.expect("create");
    assert_eq!(d.agent_name, "triage");
    assert_eq!(d.room, room);
    assert_eq!(d.metadata, r#"{"baton":"s1"}"#);
    assert!(!d.id.is_empty());
    let listed = api.list_dispatch(room).await.expect("list");
    assert!(listed.iter().any(|x| x.id == d.id && x.agent_name == "triage"), "{listed:?}");
    let deleted = api.delete_dispatch(room, &d.id).await.expect("delete");
    assert_eq!(deleted.id, d.id);
    let after = api.list_dispatch(room).await.expect("list");
    assert!(after.iter().all(|x| x.id != d.id), "{after:?}");
}

#[tokio::test]
async fn wrong_secret_is_unauthorized() {
    let server = start_server();
    let api = ServerApi::new(&server.url, KEY, "wrong-secret-wrong-secret-wrong-secret").expect("api");
    let err = api.list_dispatch("r").await.expect_err("bad secret");
    // The 401 body is plain text, so this surfaces as an unreadable reply that names the fix.
    assert!(matches!(err, ApiError::Unauthorized { .. } | ApiError::Unreadable { .. }), "{err}");
    assert!(err.to_string().contains("LIVEKIT_API_SECRET"), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn mute_and_unmute_baton_track_server_side() {
    let server = start_server();
    let room_name = "mute-room";
    let filler = FillerSound::comfort_noise(-45.0).expect("filler");
    let params = RoomParams {
        url: server.url.clone(),
        token: TokenSource::Mint {
            api_key: KEY.into(),
            api_secret: SECRET.into(),
            room: room_name.into(),
            identity: "baton".into(),
        },
        start_unmuted: true,
        filler,
        rejoin_deadline: Duration::from_secs(5),
        drop_signal: Arc::new(tokio::sync::Notify::new()),
    };
    let (stop, stop_rx) = watch::channel(false);
    let local = tokio::task::LocalSet::new();
    let api = ServerApi::new(&server.url, KEY, SECRET).expect("api");
    local
        .run_until(async move {
            let task = tokio::task::spawn_local(room::run(
                params,
                Box::new(Coordinator::minimal("server-api", false)),
                stop_rx,
            ));
            // Wait for baton's published audio track.
            let deadline = Instant::now() + Duration::from_secs(15);
            let track_sid = loop {
                let ps = api.list_participants(room_name).await.unwrap_or_default();
                if let Some(t) = ps.iter().find(|p| p.identity == "baton").and_then(|p| p.tracks.first()) {
                    break t.sid.clone();
                }
                assert!(Instant::now() < deadline, "baton never published its track");
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let t = api.mute_published_track(room_name, "baton", &track_sid, true).await.expect("mute");
            assert!(t.muted);
            // The server pushes the mute to baton's session, which answers with its own
            // MuteTrackRequest(muted), as the LiveKit SDKs do. An unmute sent before that answer
            // lands is undone by it (seen once in CI: the unmute's reply said muted), so the
            // answer is let through first: a round trip on loopback, given 300 ms.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t = api.mute_published_track(room_name, "baton", &track_sid, false).await.expect("unmute");
            assert!(!t.muted, "configs/livekit.yaml enables remote unmute");
            let t0 = Instant::now();
            let err = api
                .mute_published_track(room_name, "nobody", &track_sid, true)
                .await
                .expect_err("no such participant");
            eprintln!("muting an absent participant failed after {:?}: {err}", t0.elapsed());
            assert!(matches!(err, ApiError::NotFound { .. } | ApiError::Unavailable { .. }), "{err}");
            let _ = stop.send(true);
            let end = tokio::time::timeout(Duration::from_secs(10), task).await;
            assert!(matches!(end, Ok(Ok(Ok(_)))), "baton did not leave cleanly: {end:?}");
        })
        .await;
}
