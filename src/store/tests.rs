//! The contract of [`StateStore`], run against both backends: the embedded one on a temporary
//! directory, Redis against a real `redis-server` each test starts on a free port (skipped with a
//! message when `/usr/bin/redis-server` is missing; `scripts/setup` installs it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "baton-store-{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A `redis-server` on a free port, killed when dropped.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start_on(port: u16) -> Option<RedisServer> {
        let bin = std::path::Path::new("/usr/bin/redis-server");
        if !bin.exists() {
            eprintln!("SKIPPED: /usr/bin/redis-server is not installed (scripts/setup installs it)");
            return None;
        }
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(RedisServer { child, port })
    }

    fn start() -> Option<RedisServer> {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        Self::start_on(port)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn record(holder: &str) -> RoomRecord {
    RoomRecord {
        floor: Some(FloorRecord { identity: holder.into(), agent: "triage".into() }),
        handoff: None,
        timeline: vec!["{\"phase\":\"requested\"}".into()],
        written_by: "test".into(),
        updated_at_ms: epoch_ms(),
    }
}

fn checkpoint(agent: &str, n: usize) -> Write {
    Write::Checkpoint { agent: agent.into(), owner: "agent-1".into(), payload: vec![b'x'; n] }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// Everything a backend must do: writes fenced by the lease, the byte cap, load, forget, leases
/// that exclude, renew and lapse.
async fn contract<S: StateStore>(store: &S, room: &str) {
    let ttl = Duration::from_millis(600);
    let Acquired::Held(lease) = store.acquire(room, "baton-a", ttl).await.expect("acquire") else {
        panic!("an unheld room is free")
    };
    assert!(lease.token >= 1);
    // Another holder is refused while the lease lives; the holder renews with the same token.
    match store.acquire(room, "baton-b", ttl).await.expect("acquire") {
        Acquired::Busy(l) => assert_eq!((l.holder.as_str(), l.token), ("baton-a", lease.token)),
        other => panic!("a live lease must exclude: {other:?}"),
    }
    assert!(
        matches!(store.acquire(room, "baton-a", ttl).await, Ok(Acquired::Held(l)) if l.token == lease.token)
    );
    // Many at once (a worker's renewal tick), answered in the order asked: ours renewed with
    // its token, a room another baton holds busy, a free room taken with a new token.
    let (other, fresh) = (format!("{room}-other"), format!("{room}-fresh"));
    let Ok(Acquired::Held(o)) = store.acquire(&other, "baton-b", ttl).await else { panic!("free") };
    let ask = |room: &str| LeaseAsk { room: room.into(), holder: "baton-a".into(), ttl };
    let got = store.acquire_many(&[ask(room), ask(&other), ask(&fresh)]).await.expect("acquire_many");
    match &got[..] {
        [Ok(Acquired::Held(a)), Ok(Acquired::Busy(b)), Ok(Acquired::Held(f))] => {
            assert_eq!(a.token, lease.token, "renewed, not taken anew");
            assert_eq!((b.holder.as_str(), b.token), ("baton-b", o.token));
            assert_eq!(f.holder, "baton-a");
            store.write(&fresh, f.token, &Write::Forget).await.expect("forget");
        }
        other => panic!("acquire_many: {other:?}"),
    }
    store.write(&other, o.token, &Write::Forget).await.expect("forget");
    assert!(store.acquire_many(&[]).await.expect("nothing to renew").is_empty());

    store.write(room, lease.token, &Write::Record(record("agent-1"))).await.expect("record");
    store.write(room, lease.token, &checkpoint("triage", 100)).await.expect("checkpoint");
    store.write(room, lease.token, &checkpoint("billing", 50)).await.expect("checkpoint");
    store.write(room, lease.token, &checkpoint("triage", 120)).await.expect("replaces");
    let stale = store.write(room, lease.token + 7, &checkpoint("triage", 1)).await;
    assert!(
        matches!(stale, Err(StateError::Fenced { current, .. }) if current == lease.token),
        "a write with another token is fenced: {stale:?}"
    );
    let full = store.write(room, lease.token, &checkpoint("big", 2000)).await;
    assert!(matches!(full, Err(StateError::Full { .. })), "over the room's cap: {full:?}");

    let snap = store.load(room).await.expect("load");
    assert_eq!(
        snap.record.as_ref().and_then(|r| r.floor.clone()).map(|f| f.identity),
        Some("agent-1".into())
    );
    assert_eq!(snap.checkpoints.len(), 2, "{:?}", snap.checkpoints.keys());
    assert_eq!(snap.checkpoints["triage"], ("agent-1".to_string(), vec![b'x'; 120]));
    assert_eq!(snap.lease.as_ref().map(|l| l.token), Some(lease.token));
    assert!(store.rooms().await.expect("rooms").iter().any(|(r, l)| r == room && l.is_some()));
    assert_eq!(store.load("another-room").await.expect("load"), Snapshot::default());

    // The lease lapses: another baton gets a newer token, and the old holder is fenced out.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let Acquired::Held(next) = store.acquire(room, "baton-b", ttl).await.expect("acquire") else {
        panic!("a lapsed lease is free")
    };
    assert!(next.token > lease.token, "tokens grow: {} then {}", lease.token, next.token);
    assert!(matches!(
        store.write(room, lease.token, &checkpoint("triage", 1)).await,
        Err(StateError::Fenced { .. })
    ));
    // Release by a non-holder does nothing; by the holder frees the room.
    store.release(room, "baton-a", lease.token).await.expect("release");
    assert!(matches!(store.acquire(room, "baton-c", ttl).await, Ok(Acquired::Busy(_))));
    store.release(room, "baton-b", next.token).await.expect("release");
    assert!(matches!(store.acquire(room, "baton-c", ttl).await, Ok(Acquired::Held(_))));

    // The session ended: nothing is left.
    let Ok(Acquired::Held(c)) = store.acquire(room, "baton-c", ttl).await else { panic!() };
    store.write(room, c.token, &Write::Forget).await.expect("forget");
    assert_eq!(store.load(room).await.expect("load"), Snapshot::default());
    assert!(!store.rooms().await.expect("rooms").iter().any(|(r, _)| r == room));
}

#[test]
fn embedded_store_keeps_the_contract_and_survives_reopening() {
    let dir = temp_dir("contract");
    rt().block_on(async {
        let store = EmbeddedStore::open(&dir, 1000, Duration::from_secs(60)).expect("open");
        contract(&store, "room-1").await;
        let Acquired::Held(l) =
            store.acquire("room-2", "baton-a", Duration::from_secs(30)).await.expect("acquire")
        else {
            panic!()
        };
        store.write("room-2", l.token, &Write::Record(record("agent-9"))).await.expect("write");
        drop(store);
        // A restarted worker opens the same file: the room and its record are there.
        let again = EmbeddedStore::open(&dir, 1000, Duration::from_secs(60)).expect("reopen");
        let snap = again.load("room-2").await.expect("load");
        assert_eq!(snap.record.and_then(|r| r.floor).map(|f| f.identity), Some("agent-9".into()));
        assert!(again.rooms().await.expect("rooms").iter().any(|(r, _)| r == "room-2"));
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn embedded_store_drops_rooms_older_than_its_ttl_on_open() {
    let dir = temp_dir("ttl");
    rt().block_on(async {
        let store = EmbeddedStore::open(&dir, 1000, Duration::from_millis(200)).expect("open");
        store.write("old", 0, &Write::Record(record("a"))).await.expect("write");
        drop(store);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let store = EmbeddedStore::open(&dir, 1000, Duration::from_millis(200)).expect("reopen");
        assert_eq!(store.load("old").await.expect("load"), Snapshot::default());
        assert!(store.rooms().await.expect("rooms").is_empty());
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn redis_store_keeps_the_contract_with_ttls_on_every_room_key() {
    let Some(server) = RedisServer::start() else { return };
    rt().block_on(async {
        let store = RedisStore::new(&server.url(), 1000, Duration::from_secs(60)).expect("client");
        contract(&store, "room-1").await;
        let Acquired::Held(l) =
            store.acquire("room-2", "baton-a", Duration::from_secs(5)).await.expect("acquire")
        else {
            panic!()
        };
        store.write("room-2", l.token, &Write::Record(record("a"))).await.expect("write");
        store.write("room-2", l.token, &checkpoint("triage", 10)).await.expect("write");
        let client = ::redis::Client::open(server.url()).expect("client");
        let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
        // One room whose lease key holds the wrong type fails alone, not the whole renewal.
        let _: () = ::redis::cmd("HSET")
            .arg("baton:{room-bad}:lease")
            .arg("x")
            .arg("y")
            .query_async(&mut conn)
            .await
            .expect("hset");
        let ask = |room: &str| LeaseAsk { room: room.into(), holder: "baton-a".into(), ttl: Duration::from_secs(5) };
        let got = store.acquire_many(&[ask("room-2"), ask("room-bad"), ask("room-3")]).await.expect("renewal");
        assert!(
            matches!(&got[..], [Ok(Acquired::Held(a)), Err(StateError::Corrupt { .. }), Ok(Acquired::Held(_))] if a.token == l.token),
            "{got:?}"
        );
        for k in ["record", "ckpt", "token", "lease"] {
            let ttl: i64 = ::redis::cmd("PTTL")
                .arg(format!("baton:{{room-2}}:{k}"))
                .query_async(&mut conn)
                .await
                .expect("pttl");
            assert!(ttl > 0, "key {k} has a TTL (PTTL {ttl})");
        }
    });
}

#[test]
fn redis_store_down_fails_fast_and_the_task_catches_up_when_it_returns() {
    let Some(mut server) = RedisServer::start() else { return };
    let port = server.port;
    rt().block_on(async {
        let store = RedisStore::new(&server.url(), 1 << 20, Duration::from_secs(60)).expect("client");
        let signals: Arc<Mutex<Vec<StoreSignal>>> = Arc::default();
        let seen = signals.clone();
        let handle = spawn(store, Arc::new(move |s| seen.lock().expect("lock").push(s)));
        let Ok(Acquired::Held(l)) = handle.acquire("r", "baton-a", Duration::from_secs(30)).await else {
            panic!("acquire")
        };
        handle.write("r", l.token, checkpoint("triage", 10)).await.expect("durable");

        server.kill();
        // Writes while Redis is down wait (the room keeps going); they are answered once durable.
        let first = tokio::spawn({
            let h = handle.clone();
            async move { h.write("r", l.token, checkpoint("triage", 20)).await }
        });
        let second = tokio::spawn({
            let h = handle.clone();
            async move { h.write("r", l.token, checkpoint("triage", 30)).await }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(handle.status().degraded(), "degraded while Redis is down");
        assert!(handle.status().errors() >= 1);
        assert!(!first.is_finished() && !second.is_finished(), "no answer before the write is durable");

        let server = RedisServer::start_on(port).expect("restart");
        let answers = tokio::time::timeout(Duration::from_secs(10), async { (first.await, second.await) })
            .await
            .expect("caught up");
        assert_eq!(answers.0.expect("join"), Ok(()));
        assert_eq!(answers.1.expect("join"), Ok(()));
        assert!(!handle.status().degraded(), "caught up");
        assert!(handle.status().take_lost("r"), "the room held its lease through the outage");
        assert!(!handle.status().take_lost("r"), "told once");
        // Redis restarted empty (no persistence in this test): the newest state was written.
        let fresh = RedisStore::new(&server.url(), 1 << 20, Duration::from_secs(60)).expect("client");
        let snap = fresh.load("r").await.expect("load");
        assert_eq!(snap.checkpoints["triage"].1.len(), 30, "the newest pending state won");
        let signals = signals.lock().expect("lock").clone();
        assert!(
            signals.contains(&StoreSignal::Degraded(true)) && signals.contains(&StoreSignal::Degraded(false)),
            "{signals:?}"
        );
    });
}

#[test]
fn checkpoint_values_round_trip_and_garbage_is_refused() {
    let v = encode_checkpoint("agent-1", b"{\"seq\":3}");
    assert_eq!(decode_checkpoint(&v), Some(("agent-1".to_string(), b"{\"seq\":3}".to_vec())));
    assert_eq!(decode_checkpoint(&[1, 2]), None);
    assert_eq!(decode_checkpoint(&[255, 255, 255, 255, b'a']), None);
    let mut r = RoomRecord::default();
    for n in 0..TIMELINE_LINES + 5 {
        r.push_timeline(n.to_string());
    }
    assert_eq!(r.timeline.len(), TIMELINE_LINES);
    assert_eq!(r.timeline[0], "5", "the oldest lines go first");
}
