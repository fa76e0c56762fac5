//! The acceptance run of the nats sink: 10,000 events through a `nats` route while the
//! hook-processor is SIGKILLed five times. The stream must hold exactly 10,000 messages, one per
//! event id, and every row must be processed: a publish acknowledged by the stream but not yet
//! committed in PostgreSQL when the processor died is published again by the next processor,
//! and the stream drops it as a duplicate of its `Nats-Msg-Id`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy};
use futures::StreamExt;
use hook_core::NewEvent;
use hook_sinks::testing::NatsServer;
use hook_store::testing::TestDb;
use hook_store::tokio_postgres::Client;

const EVENTS: usize = 10_000;
const KILLS: usize = 5;

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hook-processor-nats-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

fn start(db: &TestDb, dir: &Path, run: usize) -> Child {
    let log = std::fs::File::create(dir.join(format!("processor-{run}.log"))).expect("log file");
    hook_store::testing::binary_command(env!("CARGO_BIN_EXE_hook-processor"))
        .env("DATABASE_URL", db.url())
        .env("HOOK_ROUTES", dir.join("routes.toml"))
        .env("LOG_LEVEL", "info")
        .env("HOOK_METRICS_INTERVAL", "0")
        // The crash ledger hands every event a killed processor held to the next processors as a
        // suspect, one at a time: small batches keep that to at most 50 events per kill.
        .env("BATCH_SIZE", "25")
        .env("HOOK_BATCHES_IN_FLIGHT", "2")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start hook-processor")
}

async fn processed(client: &Client) -> i64 {
    client.query_one("SELECT count(*) FROM hook_events WHERE processed", &[]).await.expect("count").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_through_nats_with_five_sigkills_are_stored_exactly_once() {
    let db = TestDb::migrated("nats_kill").await;
    let client = db.client().await;
    let nats = NatsServer::start("kill").await;
    let dir = scratch();
    std::fs::write(
        dir.join("routes.toml"),
        format!(
            "[sinks.bus]\ntype = \"nats\"\nurl = \"{}\"\nsubject = \"hooks.{{source}}.{{action}}\"\n\
             create_stream = {{ name = \"HOOKS\", duplicate_window = \"10m\" }}\n\n\
             [[routes]]\nsource = \"*\"\naction = \"*\"\nsinks = [\"bus\"]\n",
            nats.url()
        ),
    )
    .expect("routes file");

    let events: Vec<NewEvent> = (0..EVENTS)
        .map(|i| {
            NewEvent::new(
                ["PreToolUse", "PostToolUse", "Stop"][i % 3],
                "hook",
                "session",
                format!("s-{}", i % 50),
            )
        })
        .collect();
    let ids: HashSet<String> = events.iter().map(|e| e.id.to_string()).collect();
    for chunk in events.chunks(2_000) {
        hook_store::enqueue_many(&client, chunk).await.expect("enqueue");
    }

    // Kill each processor once it has made some progress, mid-batch: the next one picks up.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut kills = 0;
    let mut run = 0;
    let mut child = start(&db, &dir, run);
    loop {
        let done = processed(&client).await;
        if done as usize == EVENTS {
            break;
        }
        assert!(Instant::now() < deadline, "stuck at {done} processed; logs in {}", dir.display());
        if let Ok(Some(status)) = child.try_wait() {
            panic!("hook-processor exited by itself ({status}); logs in {}", dir.display());
        }
        if kills < KILLS && done as usize >= (kills + 1) * EVENTS / (KILLS + 2) {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            kills += 1;
            run += 1;
            child = start(&db, &dir, run);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(kills, KILLS, "the processor was killed {kills} times only; the run ended too soon");

    let dead: i64 = client
        .query_one("SELECT count(*) FROM hook_events WHERE dead_at IS NOT NULL", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(dead, 0);
    let republished: i64 = client
        .query_one(
            "SELECT count(*) FROM hook_events WHERE result_metadata->'sinks'->'bus'->>'duplicate' = 'true'",
            &[],
        )
        .await
        .expect("count")
        .get(0);

    // The stream: exactly one message per event id.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let mut stream = js.get_stream("HOOKS").await.expect("stream");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.state.messages, EVENTS as u64, "messages in the stream");
    let consumer = stream
        .create_consumer(pull::Config { ack_policy: AckPolicy::None, ..Default::default() })
        .await
        .expect("consumer");
    let mut seen = HashSet::new();
    let mut read = 0usize;
    while read < EVENTS {
        let mut batch = consumer
            .fetch()
            .max_messages(1_000)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .expect("fetch");
        let before = read;
        while let Some(message) = batch.next().await {
            let message = message.expect("message");
            let id = message.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).expect("msg id").to_string();
            let body: serde_json::Value = serde_json::from_slice(&message.payload).expect("event JSON");
            assert_eq!(body["id"], id.as_str(), "the message id is the event's");
            seen.insert(id);
            read += 1;
        }
        assert!(read > before, "the stream ran dry at {read} messages");
    }
    assert_eq!(seen.len(), EVENTS, "one message per event id");
    assert_eq!(seen, ids, "the stream holds exactly the inserted events");
    eprintln!(
        "{kills} SIGKILLs; {republished} events were published again after a kill and dropped as duplicates"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
