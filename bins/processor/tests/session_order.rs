//! The acceptance run of session order (issue 12, item 3): 50 sessions x 200 events through a
//! webhook route with `order = "session"`, four hook-processor processes, and a receiver that
//! answers each delivery after a pseudo-random delay (20 to 60 ms). The receiver must see every
//! session's events in `created_at` order, never two of one session at once, from more than one
//! processor; and the sessions must interleave: the 10,000 events drain at least 10 times as
//! fast (in events per second) as one session's 200 do through the same processors, i.e. in at
//! most 5 times its drain time (10,000 / 200 = 50 times the events, in at most 50 / 10 = 5
//! times the time).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use hook_store::testing::TestDb;
use hook_store::tokio_postgres::Client;

const PROCESSORS: usize = 4;
const SESSIONS: usize = 50;
const PER_SESSION: usize = 200;
/// Shortest and longest delay of the receiver's answer, in ms: long enough that one session's
/// drain is bound by them (as a real receiver's would be), not by the CPUs the four debug-built
/// processors share with the database, so that the interleaving shows whatever the machine's load
/// (at 0-10 ms, the run under a full `cargo test --workspace` next to a release build measured 9.4x).
const MIN_DELAY_MS: u64 = 20;
const MAX_DELAY_MS: u64 = 60;

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hook-processor-session-order-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// What the receiver saw: each delivery's event id and processor (the URL path), in order of
/// arrival, and deliveries that arrived while another of the same session was unanswered.
#[derive(Default)]
struct Seen {
    arrivals: Vec<(String, usize)>,
    in_flight: HashSet<String>,
    overlaps: Vec<String>,
    /// Event id → session, filled before the events are inserted.
    sessions: HashMap<String, String>,
}

type Shared = Arc<Mutex<Seen>>;

async fn receive(State(seen): State<Shared>, uri: Uri, body: Bytes) -> StatusCode {
    let event: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(event) => event,
        Err(_) => return StatusCode::BAD_REQUEST,
    };
    let id = event["id"].as_str().unwrap_or_default().to_owned();
    let processor: usize = uri.path().trim_start_matches("/p").parse().unwrap_or(usize::MAX);
    let session = {
        let mut seen = seen.lock().expect("lock");
        let session = seen.sessions.get(&id).cloned().unwrap_or_default();
        if !seen.in_flight.insert(session.clone()) {
            seen.overlaps.push(format!("{id} of session {session} while another was in flight"));
        }
        seen.arrivals.push((id.clone(), processor));
        session
    };
    // A delay from the event id: spread over MIN_DELAY_MS..=MAX_DELAY_MS, different for each event.
    let hash =
        id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    tokio::time::sleep(Duration::from_millis(MIN_DELAY_MS + hash % (MAX_DELAY_MS - MIN_DELAY_MS + 1))).await;
    seen.lock().expect("lock").in_flight.remove(&session);
    StatusCode::OK
}

fn start(db: &TestDb, dir: &Path, n: usize) -> Child {
    let log = std::fs::File::create(dir.join(format!("processor-{n}.log"))).expect("log file");
    hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-processor"))
        .env("DATABASE_URL", db.url())
        .env("HOOK_ROUTES", dir.join(format!("routes-{n}.toml")))
        .env("LOG_LEVEL", "warn")
        .env("HOOK_METRICS_INTERVAL", "0")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start hook-processor")
}

/// Inserts `per` events for each session of `sessions`, interleaved (event 0 of every session,
/// then event 1, ...), `created_at` 1 µs apart, in one statement; returns the ids.
async fn insert(client: &Client, seen: &Shared, sessions: &[String], per: usize) -> Vec<String> {
    let (mut ids, mut keys) = (Vec::new(), Vec::new());
    for _ in 0..per {
        for session in sessions {
            ids.push(uuid::Uuid::new_v4());
            keys.push(session.clone());
        }
    }
    {
        let mut seen = seen.lock().expect("lock");
        for (id, key) in ids.iter().zip(&keys) {
            seen.sessions.insert(id.to_string(), key.clone());
        }
    }
    client
        .execute(
            "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, metadata, created_at)
             SELECT id, 'Agent', 'step', 'session', key, jsonb_build_object('session_id', key),
                    jsonb_build_object('session_id', key), clock_timestamp() + ord * interval '1 microsecond'
             FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS t(id, key, ord)",
            &[&ids, &keys],
        )
        .await
        .expect("insert events");
    ids.iter().map(ToString::to_string).collect()
}

async fn processed(client: &Client) -> i64 {
    client.query_one("SELECT count(*) FROM hook_events WHERE processed", &[]).await.expect("count").get(0)
}

/// Waits until `total` events are processed; how long it took from `from`.
async fn drained(client: &Client, total: i64, from: Instant, patience: Duration) -> Duration {
    loop {
        if processed(client).await >= total {
            return from.elapsed();
        }
        assert!(
            from.elapsed() < patience,
            "{} of {total} processed after {patience:?}",
            processed(client).await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sessions_through_four_processors_arrive_in_order_and_interleave() {
    let db = TestDb::migrated("processor_session_order").await;
    let client = db.client().await;
    let dir = scratch();
    let seen: Shared = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the receiver");
    let port = listener.local_addr().expect("address").port();
    let app = axum::Router::new().fallback(receive).with_state(Arc::clone(&seen));
    tokio::spawn(async move { axum::serve(listener, app).await });
    for n in 0..PROCESSORS {
        std::fs::write(
            dir.join(format!("routes-{n}.toml")),
            format!(
                "[sinks.hook]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{port}/p{n}\"\ntimeout = \"5s\"\n\n\
                 [[routes]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"hook\"]\norder = \"session\"\n"
            ),
        )
        .expect("routes file");
    }
    let mut children: Vec<Child> = (0..PROCESSORS).map(|n| start(&db, &dir, n)).collect();
    let ready = Instant::now();
    loop {
        let present: i64 =
            client.query_one("SELECT count(*) FROM hook_events_processors", &[]).await.expect("count").get(0);
        if present >= PROCESSORS as i64 {
            break;
        }
        assert!(ready.elapsed() < Duration::from_secs(60), "{present} of {PROCESSORS} processors claiming");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // One session alone: its drain time is the yardstick.
    let solo = insert(&client, &seen, &["solo".to_owned()], PER_SESSION).await;
    let single = drained(&client, PER_SESSION as i64, Instant::now(), Duration::from_secs(120)).await;
    // Fifty at once.
    let sessions: Vec<String> = (0..SESSIONS).map(|s| format!("s{s}")).collect();
    let started = Instant::now();
    let many = insert(&client, &seen, &sessions, PER_SESSION).await;
    let total = (PER_SESSION + SESSIONS * PER_SESSION) as i64;
    let all = drained(&client, total, started, Duration::from_secs(600)).await;
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }

    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    assert!(
        seen.overlaps.is_empty(),
        "one at a time per session: {:?}",
        &seen.overlaps[..seen.overlaps.len().min(5)]
    );
    // Every event once (no retries were asked for), each session in created_at order: the
    // order of insertion, read back by (created_at, id).
    let rows = client
        .query("SELECT id::text, metadata->>'session_id' FROM hook_events ORDER BY created_at, id", &[])
        .await
        .expect("the events in order");
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for row in &rows {
        expected.entry(row.get(1)).or_default().push(row.get(0));
    }
    let mut observed: HashMap<String, Vec<String>> = HashMap::new();
    let mut by_processor: HashMap<String, HashSet<usize>> = HashMap::new();
    for (id, processor) in &seen.arrivals {
        let session = seen.sessions[id].clone();
        observed.entry(session.clone()).or_default().push(id.clone());
        by_processor.entry(session).or_default().insert(*processor);
    }
    assert_eq!(seen.arrivals.len(), solo.len() + many.len(), "each event delivered once");
    assert_eq!(observed.len(), SESSIONS + 1);
    for (session, ids) in &expected {
        assert!(observed.get(session) == Some(ids), "session {session} out of created_at order");
    }
    let processors: HashSet<usize> = seen.arrivals.iter().map(|(_, p)| *p).collect();
    let shared = by_processor.values().filter(|p| p.len() > 1).count();
    eprintln!(
        "one session: {PER_SESSION} events in {single:?}; {SESSIONS} sessions: {} events in {all:?} \
         ({:.1}x the events per second); processors used: {processors:?}; sessions handled by more than one: {shared}",
        many.len(),
        (many.len() as f64 / all.as_secs_f64()) / (PER_SESSION as f64 / single.as_secs_f64())
    );
    assert!(processors.len() > 1, "all events went through one processor: {processors:?}");
    assert!(shared > 0, "no session was handled by more than one processor");
    // Throughput at least 10x: 50x the events in at most 5x the time.
    assert!(
        all <= single * (SESSIONS as u32 / 10),
        "sessions did not interleave: {SESSIONS} sessions took {all:?}, one took {single:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
