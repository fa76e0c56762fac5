//! The claim ledger and the byte budget at the store level, on a real PostgreSQL: what a dead
//! holder leaves behind, how its events are retried alone and charged, what a known rollback
//! clears; claims bounded by bytes; and COMMIT replies lost on a TCP proxy of the test's own.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hook_core::{ClaimRequest, ClaimedBatch, HookEvent, Outcome, Resolution, Store};
use hook_store::testing::TestDb;
use hook_store::tokio_postgres::config::Host;
use hook_store::{PgBatch, PgStore, StoreOptions};
use hook_tests::crash::{kill_the_claim, kill_the_processor, registered};
use hook_tests::worker::Deadline;
use hook_tests::{count, insert_events};
use serde_json::Map;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_postgres::Client;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(60);

fn no_listen() -> StoreOptions {
    StoreOptions { listen: false, ..StoreOptions::default() }
}

fn request(isolate: bool) -> ClaimRequest {
    ClaimRequest { limit: 100, isolate, ..ClaimRequest::default() }
}

async fn claim(store: &PgStore, isolate: bool) -> Option<(PgBatch, Vec<HookEvent>)> {
    let mut batch = store.claim(request(isolate)).await.expect("the claim")?;
    let events = batch.take_events();
    Some((batch, events))
}

fn succeeded(id: Uuid) -> Outcome {
    Outcome { id, resolution: Resolution::Succeeded, metadata: Map::new() }
}

/// Ledger rows that name events (the cleared slots of the layout before migration 0012 would
/// not count).
async fn ledger_rows(client: &Client) -> i64 {
    count(client, LEDGER_ROWS).await
}

const LEDGER_ROWS: &str =
    "SELECT count(*) FROM hook_events_claims WHERE holder IS NOT NULL OR cardinality(event_ids) > 0 OR note IS NOT NULL";

#[tokio::test]
async fn a_committed_or_released_batch_leaves_no_ledger_row() {
    let db = TestDb::migrated("ledger_commit_release").await;
    let client = db.client().await;
    let ids = insert_events(&client, 4, "Fine", "a").await;
    let store = db.store(no_listen()).await;
    let (mut batch, events) = claim(&store, false).await.expect("a batch");
    assert_eq!(events.len(), 4);
    assert_eq!(ledger_rows(&client).await, 0, "nothing is written at claim");
    batch.start().await.unwrap();
    let live = "SELECT count(*) FROM hook_events_claims \
                WHERE NOT pg_visible_in_snapshot(holder, pg_current_snapshot()) AND cardinality(event_ids) = 4";
    assert_eq!(count(&client, live).await, 1, "a started batch is recorded, with a live holder");
    batch.finish(vec![succeeded(ids[0]), succeeded(ids[1])]).await.unwrap();
    assert_eq!(ledger_rows(&client).await, 0, "a committed batch clears its row with its outcomes");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events_claims").await, 0, "deleted, not kept");

    let (mut batch, events) = claim(&store, false).await.expect("a batch");
    assert_eq!(events.len(), 2);
    batch.start().await.unwrap();
    batch.release().await;
    assert_eq!(ledger_rows(&client).await, 0, "a released batch clears its row");
    assert_eq!(count(&client, "SELECT count(*) FROM hook_events_claims").await, 0);
    let (batch, events) = claim(&store, false).await.expect("the released events, not suspect");
    assert_eq!(events.len(), 2);
    assert!(!batch.isolated());
    batch.release().await;
}

#[tokio::test]
async fn a_dead_holders_events_are_retried_one_at_a_time_and_not_charged() {
    let db = TestDb::migrated("ledger_dead_holder").await;
    let client = db.client().await;
    let ids = insert_events(&client, 3, "Fine", "a").await;
    let later = insert_events(&client, 2, "Later", "a").await;
    let a = db.store(no_listen()).await;
    let (mut batch, events) = claim(&a, false).await.expect("a batch");
    assert_eq!(events.len(), 5);
    registered(&client).await;
    batch.start().await.unwrap();
    let under_key =
        "SELECT count(*) FROM hook_events_claims WHERE processor IS NOT NULL AND cardinality(event_ids) = 5";
    assert_eq!(count(&client, under_key).await, 1, "recorded under the store's presence key");
    kill_the_processor(&client).await;
    drop(batch);

    // An ordinary claim leaves the suspects alone, and says they are waiting.
    let b = db.store(no_listen()).await;
    assert!(b.claim(request(false)).await.unwrap().is_none(), "suspects are not claimed in a batch");
    assert!(b.suspects_waiting());
    // An isolated claim: the oldest suspect alone; the others stay suspect meanwhile.
    for (i, id) in ids.iter().chain(&later).enumerate() {
        let (mut batch, events) = claim(&b, true).await.expect("a suspect");
        assert!(batch.isolated(), "suspect {i} is handled alone");
        assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), [*id], "oldest first");
        assert_eq!(events[0].retry_count, 0, "not charged: which one crashed is not known");
        assert!(batch.take_crashed().is_empty());
        let c = db.store(no_listen()).await;
        assert!(c.claim(request(false)).await.unwrap().is_none(), "the rest stay out of ordinary claims");
        batch.start().await.unwrap();
        batch.finish(vec![succeeded(*id)]).await.unwrap();
    }
    assert!(b.claim(request(true)).await.unwrap().is_none());
    assert!(!b.suspects_waiting());
    assert_eq!(ledger_rows(&client).await, 0);
    let clean =
        "SELECT count(*) FROM hook_events WHERE processed AND retry_count = 0 AND processing_errors IS NULL";
    assert_eq!(count(&client, clean).await, 5);
}

#[tokio::test]
async fn a_suspect_whose_isolated_holder_dies_is_charged_once_and_stays_isolated() {
    let db = TestDb::migrated("ledger_isolated_crash").await;
    let client = db.client().await;
    let id = insert_events(&client, 1, "Poison", "a").await[0];
    let a = db.store(no_listen()).await;
    let (mut batch, _) = claim(&a, false).await.expect("a batch");
    batch.start().await.unwrap();
    kill_the_claim(&client).await;
    drop(batch);

    // Alone now, and dies again.
    let (mut batch, events) = claim(&a, true).await.expect("the suspect");
    assert!(batch.isolated());
    assert_eq!(events[0].id, id);
    batch.start().await.unwrap();
    kill_the_claim(&client).await;
    drop(batch);

    // The next isolated claimer counts the crash; another one meanwhile does not see it.
    let b = db.store(no_listen()).await;
    let mut charge = b.claim(request(true)).await.unwrap().expect("the crash to count");
    assert!(charge.take_events().is_empty());
    let crashed = charge.take_crashed();
    assert_eq!(crashed.iter().map(|e| (e.id, e.retry_count)).collect::<Vec<_>>(), [(id, 0)]);
    let c = db.store(no_listen()).await;
    assert!(c.claim(request(true)).await.unwrap().is_none(), "a crash is counted by one claimer only");
    let failed = |retry_after| Outcome {
        id,
        resolution: Resolution::Failed {
            error: "processor died while this event was being handled (attempt 1)".into(),
            retry_after,
        },
        metadata: Map::new(),
    };
    charge.finish(vec![failed(Some(Duration::ZERO))]).await.unwrap();
    let row = client
        .query_one(
            "SELECT retry_count, processing_errors, dead_at IS NULL FROM hook_events WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(
        row.get::<_, Vec<String>>(1),
        ["processor died while this event was being handled (attempt 1)"]
    );
    assert!(row.get::<_, bool>(2));

    // Its next attempt is alone too, never in a batch.
    assert!(c.claim(request(false)).await.unwrap().is_none());
    let (mut batch, events) = claim(&c, true).await.expect("the suspect again");
    assert!(batch.isolated());
    assert_eq!((events[0].id, events[0].retry_count), (id, 1));
    batch.start().await.unwrap();
    kill_the_claim(&client).await;
    drop(batch);
    // Charged at the limit: dead, and out of the ledger.
    let mut charge = c.claim(request(true)).await.unwrap().expect("the second crash");
    assert_eq!(charge.take_crashed().len(), 1);
    charge.finish(vec![failed(None)]).await.unwrap();
    assert_eq!(
        count(&client, "SELECT count(*) FROM hook_events WHERE dead_at IS NOT NULL AND retry_count = 2")
            .await,
        1
    );
    assert_eq!(ledger_rows(&client).await, 0);
}

#[tokio::test]
async fn claims_stop_at_the_byte_limit_and_an_event_too_large_alone_is_set_aside_unfetched() {
    let db = TestDb::migrated("ledger_byte_limit").await;
    let client = db.client().await;
    // Payloads of about 10 kB of JSON (hex text, little compression) and one of about 40 kB.
    let insert = |kb: i32| {
        let client = &client;
        async move {
            let id = Uuid::new_v4();
            client
                .execute(
                    "INSERT INTO hook_events (id, source, action, resource, resource_id, payload, created_at) \
                     SELECT $1, 'Big', 'a', 'r', 'r', jsonb_build_object('blob', string_agg(md5(i::text), '')), clock_timestamp() \
                     FROM generate_series(1, $2 * 32) AS i",
                    &[&id, &kb],
                )
                .await
                .unwrap();
            id
        }
    };
    let (e1, e2, e3, big, e5) =
        (insert(10).await, insert(10).await, insert(10).await, insert(40).await, insert(1).await);
    let store = db.store(no_listen()).await;
    let limited = ClaimRequest { max_bytes: 25_000, max_event_bytes: 25_000, ..request(false) };
    let mut batch = store.claim(limited).await.unwrap().expect("a batch");
    let got: Vec<Uuid> = batch.take_events().iter().map(|e| e.id).collect();
    assert_eq!(got, [e1, e2], "events are added while their bytes fit");
    assert!((20_000..25_000).contains(&batch.bytes()), "{} bytes", batch.bytes());
    assert_eq!(
        (batch.held_back(), batch.set_aside()),
        (2, 1),
        "held back: e3 and e5; set aside: the big one"
    );
    batch.finish(vec![succeeded(e1), succeeded(e2)]).await.unwrap();
    let row = client
        .query_one("SELECT dead_at IS NOT NULL, processing_errors FROM hook_events WHERE id = $1", &[&big])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    let reason = &row.get::<_, Vec<String>>(1)[0];
    assert!(reason.contains("bytes of JSON, more than the processor may hold at once"), "{reason}");
    assert!(reason.ends_with("set aside as dead without being fetched"), "{reason}");
    let mut batch = store.claim(limited).await.unwrap().expect("the held-back rows");
    let got: Vec<Uuid> = batch.take_events().iter().map(|e| e.id).collect();
    assert_eq!(got, [e3, e5]);
    batch.release().await;
}

// ---------------------------------------------------------------------------------------------
// Lost COMMIT replies, on a proxy of the test's own
// ---------------------------------------------------------------------------------------------

/// What the proxy does with the next COMMIT a client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Forward everything.
    Nothing,
    /// Forward the COMMIT, then close the client's connection before the reply.
    AfterCommit,
    /// Close the connection instead of forwarding the COMMIT.
    BeforeCommit,
    /// Forward the COMMIT, then close every connection and refuse new ones.
    Everything,
}

/// A loopback TCP proxy to the test database that can lose a COMMIT's reply.
struct Proxy {
    port: u16,
    cut: Arc<Mutex<Cut>>,
}

type Stream = Box<dyn AsyncReadWrite>;
trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

impl Proxy {
    async fn start(db: &TestDb) -> Proxy {
        let config = db.config();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let upstream = config.get_hosts().first().cloned().expect("a host");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let proxy_port = listener.local_addr().expect("the proxy's address").port();
        let cut = Arc::new(Mutex::new(Cut::Nothing));
        let (gone_tx, gone_rx) = watch::channel(false);
        let refuse = Arc::new(AtomicBool::new(false));
        let (shared_cut, gone_tx) = (Arc::clone(&cut), Arc::new(gone_tx));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    continue;
                }
                let server: Stream = match &upstream {
                    Host::Tcp(host) => Box::new(
                        tokio::net::TcpStream::connect((host.as_str(), port))
                            .await
                            .expect("connect upstream"),
                    ),
                    Host::Unix(dir) => Box::new(
                        tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}")))
                            .await
                            .expect("connect upstream"),
                    ),
                };
                tokio::spawn(pump(
                    client,
                    server,
                    Arc::clone(&shared_cut),
                    Arc::clone(&refuse),
                    Arc::clone(&gone_tx),
                    gone_rx.clone(),
                ));
            }
        });
        Proxy { port: proxy_port, cut }
    }

    fn arm(&self, cut: Cut) {
        *self.cut.lock().expect("the cut") = cut;
    }

    async fn store(&self, db: &TestDb) -> PgStore {
        let direct = db.config();
        let mut config = hook_store::tokio_postgres::Config::new();
        config.host("127.0.0.1").port(self.port).dbname(direct.get_dbname().unwrap_or("postgres"));
        if let Some(user) = direct.get_user() {
            config.user(user);
        }
        if let Some(password) = direct.get_password() {
            config.password(password);
        }
        PgStore::connect(
            config,
            StoreOptions { listen: false, pool_timeout: Duration::from_secs(2), ..StoreOptions::default() },
        )
        .await
        .expect("connect the store through the proxy")
    }
}

/// Forwards one connection both ways until either side closes, or a cut (see [`Cut`]). After a
/// cut that forwards the COMMIT, the client's side is closed at once while the server's replies
/// are still read (and thrown away) until it closes: the server commits and its reply is lost.
async fn pump(
    client: tokio::net::TcpStream,
    server: Stream,
    cut: Arc<Mutex<Cut>>,
    refuse: Arc<AtomicBool>,
    gone_tx: Arc<watch::Sender<bool>>,
    gone: watch::Receiver<bool>,
) {
    let (mut client_read, client_write) = client.into_split();
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let this_cut = Arc::new(AtomicBool::new(false));
    let downstream = {
        let this_cut = Arc::clone(&this_cut);
        let mut gone = gone.clone();
        tokio::spawn(async move {
            let mut client_write = Some(client_write);
            let mut buf = vec![0u8; 64 * 1024];
            let mut watching = true;
            loop {
                let n = tokio::select! {
                    n = server_read.read(&mut buf) => n.unwrap_or(0),
                    _ = gone.changed(), if watching => {
                        // Every connection closes, except the one whose COMMIT is being drained.
                        watching = false;
                        if this_cut.load(Ordering::SeqCst) {
                            continue;
                        }
                        0
                    }
                };
                if n == 0 {
                    return;
                }
                if this_cut.load(Ordering::SeqCst) {
                    // The reply is lost: the client's side is closed, the server is drained.
                    client_write = None;
                    continue;
                }
                let Some(writer) = client_write.as_mut() else { return };
                if writer.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut gone = gone;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            n = client_read.read(&mut buf) => n.unwrap_or(0),
            _ = gone.changed() => 0,
        };
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        let armed = *cut.lock().expect("the cut");
        if armed != Cut::Nothing && chunk.windows(7).any(|w| w == b"COMMIT\0") {
            *cut.lock().expect("the cut") = Cut::Nothing;
            this_cut.store(true, Ordering::SeqCst);
            if armed == Cut::BeforeCommit {
                break;
            }
            let _ = server_write.write_all(chunk).await;
            let _ = server_write.flush().await;
            drop(client_read);
            if armed == Cut::Everything {
                refuse.store(true, Ordering::SeqCst);
                let _ = gone_tx.send(true);
            }
            // Give the server time to commit and answer, then close its side too.
            let _ = tokio::time::timeout(Duration::from_secs(2), downstream).await;
            return;
        }
        if server_write.write_all(chunk).await.is_err() {
            break;
        }
    }
    downstream.abort();
}

/// Inserts one event and claims every claimable one through `proxy_store`; returns the batch,
/// started, and the outcomes of success for its events.
async fn claim_through(proxy_store: &PgStore, client: &Client) -> (PgBatch, Vec<Outcome>) {
    insert_events(client, 1, "Fine", "a").await;
    let (mut batch, events) = claim(proxy_store, false).await.expect("a batch");
    batch.start().await.expect("start the batch");
    (batch, events.iter().map(|e| succeeded(e.id)).collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_commit_reply_is_found_out_or_reported_as_unknown_never_as_a_rollback() {
    let db = TestDb::migrated("ledger_lost_commit").await;
    let client = db.client().await;
    let proxy = Proxy::start(&db).await;
    let processed = "SELECT count(*) FROM hook_events WHERE processed";

    // The COMMIT went through, its reply was lost: the store asks, and reports success.
    let store = proxy.store(&db).await;
    let (batch, outcomes) = claim_through(&store, &client).await;
    proxy.arm(Cut::AfterCommit);
    let finished = batch.finish(outcomes).await;
    assert!(finished.is_ok(), "{finished:?}");
    assert_eq!(count(&client, processed).await, 1);
    assert_eq!(ledger_rows(&client).await, 0);

    // The COMMIT never arrived: the store asks, learns it was rolled back, and says so (and
    // clears the ledger row: nothing crashed).
    let (batch, outcomes) = claim_through(&store, &client).await;
    proxy.arm(Cut::BeforeCommit);
    let error = batch.finish(outcomes).await.expect_err("rolled back");
    assert!(!PgBatch::is_outcome_unknown(&error), "{error}");
    let deadline = Deadline::new(PATIENCE, "the ledger row of the rolled-back batch to be cleared");
    while ledger_rows(&client).await > 0 {
        deadline.tick().await;
    }
    assert_eq!(count(&client, processed).await, 1);

    // The COMMIT went through and the database cannot be asked: outcome unknown.
    let (batch, outcomes) = claim_through(&store, &client).await;
    assert_eq!(outcomes.len(), 2, "the rolled-back event and a new one");
    proxy.arm(Cut::Everything);
    let error = batch.finish(outcomes).await.expect_err("unknown");
    assert!(PgBatch::is_outcome_unknown(&error), "{error}");
    assert!(error.to_string().contains("outcome unknown; the next claim will tell"), "{error}");
    // It did commit, as the next claim would find.
    let deadline = Deadline::new(PATIENCE, "the commit to be visible");
    while count(&client, processed).await < 3 {
        deadline.tick().await;
    }
    assert_eq!(ledger_rows(&client).await, 0);
}

/// A dead processor's presence session ends before its claim session (the server ends both, in
/// no set order), and another processor's recovery runs in between: the recovery's first
/// statement sees the batch's holder still live and leaves its row, and by the time it strikes
/// the processor off (its last statement, with a snapshot of its own) the holder is gone. The
/// processor must not be struck off while a row of its batch is left unrecovered: no claim would
/// read that row again (its key is in no registry row), so the dead batch's events, the one that
/// crashed among them, would go to an ordinary batch, uncharged. The instant between the two
/// statements is widened here by a lock on `hook_events_processors` that the last statement
/// waits for.
#[tokio::test]
async fn a_dead_processor_is_not_struck_off_while_a_row_of_its_batch_is_left() {
    let db = TestDb::migrated("ledger_strike_off_race").await;
    let client = db.client().await;
    let ids = insert_events(&client, 3, "Fine", "a").await;
    let a = db.store(no_listen()).await;
    let (mut batch, events) = claim(&a, false).await.expect("a batch");
    assert_eq!(events.len(), 3);
    registered(&client).await;
    batch.start().await.unwrap();
    let holder: i32 = client
        .query_one(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // The presence dies first; the claim's session lives on for a moment.
    let presence = "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks AS l \
                    WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted \
                      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    assert_eq!(count(&client, presence).await, 1);
    let deadline = Deadline::new(PATIENCE, "the presence's lock to be free");
    let held = "SELECT count(*) FROM pg_locks AS l JOIN hook_events_processors AS p \
                  ON ((l.classid::int8 << 32) | l.objid::int8) = p.key \
                WHERE l.locktype = 'advisory' AND l.granted";
    while count(&client, held).await > 0 {
        deadline.tick().await;
    }

    // Another processor's recovery, held before its last statement.
    let mut blocker = db.client().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE hook_events_processors IN SHARE MODE").await.unwrap();
    let b = db.store(no_listen()).await;
    let recovery = tokio::spawn(async move {
        let claimed = b.claim(request(true)).await.unwrap().map(|mut batch| {
            let events = batch.take_events();
            (batch, events)
        });
        (b, claimed)
    });
    let deadline = Deadline::new(PATIENCE, "the recovery to wait for the registry's lock");
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock' \
                     AND query LIKE 'WITH orphans AS%'";
    while count(&client, waiting).await == 0 {
        deadline.tick().await;
    }
    // Now the claim's session ends too, and the recovery goes on.
    let _ = client.execute("SELECT pg_terminate_backend($1)", &[&holder]).await.unwrap();
    let deadline = Deadline::new(PATIENCE, "the killed claim's session to end");
    while count(&client, &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {holder}")).await > 0 {
        deadline.tick().await;
    }
    drop(batch);
    lock.commit().await.unwrap();
    let (b, claimed) = recovery.await.unwrap();
    if let Some((batch, events)) = claimed {
        let taken = events.iter().filter(|e| ids.contains(&e.id)).count();
        batch.release().await;
        panic!("the dead batch's events went to a claim as ordinary events ({taken} of 3)");
    }
    // The next isolated claim recovers the row, strikes the processor off, and runs a suspect alone.
    let (batch, events) = claim(&b, true).await.expect("a suspect");
    assert!(batch.isolated());
    assert_eq!(events.iter().map(|e| (e.id, e.retry_count)).collect::<Vec<_>>(), [(ids[0], 0)]);
    batch.release().await;
    let left = "SELECT count(*) FROM hook_events_claims AS c \
                WHERE c.processor IS NOT NULL \
                  AND NOT EXISTS (SELECT 1 FROM hook_events_processors AS p WHERE p.key = c.processor)";
    assert_eq!(count(&client, left).await, 0, "no batch row of a processor struck off");
}

/// A store's presence session ends while its process lives (terminated, a network cut): until
/// its next ping the store does not know, and goes on recording batches under the old key. A
/// recovery may strike that key off meanwhile (its lock is free, no row names it), and a batch
/// recorded under it afterwards is one no claim reads: if its process then dies, its events go
/// to ordinary claims, the one that crashed among them, uncharged. A batch must be recorded
/// under a key only while the key is registered.
#[tokio::test]
async fn a_batch_recorded_under_a_key_struck_off_is_still_kept_out_of_ordinary_claims() {
    let db = TestDb::migrated("ledger_stale_key").await;
    let client = db.client().await;
    let warm = insert_events(&client, 1, "Warm", "a").await;
    let a = db.store(no_listen()).await;
    let (mut batch, _) = claim(&a, false).await.expect("a batch");
    registered(&client).await;
    batch.start().await.unwrap();
    batch.finish(vec![succeeded(warm[0])]).await.unwrap();
    let key: i64 = client.query_one("SELECT key FROM hook_events_processors", &[]).await.unwrap().get(0);

    // Its presence session ends; the store learns it only at its next ping.
    let presence = format!(
        "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks AS l \
         WHERE l.locktype = 'advisory' AND l.granted AND ((l.classid::int8 << 32) | l.objid::int8) = {key}"
    );
    assert_eq!(count(&client, &presence).await, 1);
    let held = format!(
        "SELECT count(*) FROM pg_locks AS l WHERE l.locktype = 'advisory' \
           AND ((l.classid::int8 << 32) | l.objid::int8) = {key}"
    );
    let deadline = Deadline::new(PATIENCE, "the presence's lock to be free");
    while count(&client, &held).await > 0 {
        deadline.tick().await;
    }
    // Another processor's recovery strikes the key off: gone, and no row names it.
    let b = db.store(no_listen()).await;
    assert!(b.claim(request(true)).await.unwrap().is_none());
    let listed = format!("SELECT count(*) FROM hook_events_processors WHERE key = {key}");
    assert_eq!(count(&client, &listed).await, 0, "struck off");

    // The store's next batch, then its process dies.
    let ids = insert_events(&client, 3, "Fine", "a").await;
    let (mut batch, events) = claim(&a, false).await.expect("a batch");
    assert_eq!(events.len(), 3);
    batch.start().await.unwrap();
    kill_the_claim(&client).await;
    drop(batch);

    if let Some((batch, events)) = claim(&b, false).await {
        let taken = events.iter().filter(|e| ids.contains(&e.id)).count();
        batch.release().await;
        panic!("the dead batch's events went to an ordinary claim ({taken} of 3)");
    }
    assert!(b.suspects_waiting());
    let (batch, events) = claim(&b, true).await.expect("a suspect");
    assert!(batch.isolated());
    assert_eq!(events.iter().map(|e| (e.id, e.retry_count)).collect::<Vec<_>>(), [(ids[0], 0)]);
    batch.release().await;
}
