//! An order service that embeds hook-events: it places orders and enqueues their events in the
//! same transactions, and processes those events with its own handlers, on an engine that runs in
//! its own tokio runtime next to the service's other tasks.
//!
//! ```sh
//! DATABASE_URL=postgres://app@localhost/app cargo run -p hook-store --example embedded_service
//! cargo run -p hook-store --example embedded_service   # an embedded cluster under ./.hook-data
//! ```
//!
//! It places `ORDERS` orders (default 5) and stops once every one is confirmed, or on Ctrl-C.
//! What it shows:
//!
//! - **Transactional enqueue.** An order row and its `OrderService/order_placed` event are
//!   committed together or not at all: the handler that confirms an order can count on the row
//!   being there, and the order that is rolled back ("out of stock") leaves no event behind.
//! - **Routing.** An exact route (`OrderService/order_placed`), a source wildcard
//!   (`OrderService/*`, here the order notes) and the global wildcard (`*/*`, anything else, here
//!   a billing event), on top of the default handlers of Claude Code's hook events.
//! - **Running and stopping.** The engine is one task among others (order intake, a progress
//!   reporter); a watch channel stops them all, and the engine drains its handlers before it
//!   returns its totals.

use std::error::Error;
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hook_core::{
    default_registry, Engine, EngineConfig, HandlerResult, HookEvent, MetricsSnapshot, NewEvent,
};
use hook_store::deadpool_postgres::Pool;
use hook_store::tokio_postgres::Config;
use hook_store::{enqueue, enqueue_many, ClusterOptions, EmbeddedCluster, PgStore, StoreOptions};
use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

pub(crate) type BoxError = Box<dyn Error + Send + Sync>;

/// The service's own table.
const CREATE_ORDERS: &str = "CREATE TABLE IF NOT EXISTS example_orders (
    id uuid PRIMARY KEY,
    run uuid NOT NULL,
    item text NOT NULL,
    status text NOT NULL DEFAULT 'placed'
)";

/// What one run of the service did.
#[derive(Debug)]
pub(crate) struct Report {
    /// This run's id (`example_orders.run`).
    pub(crate) run: Uuid,
    /// Orders confirmed by the exact-route handler.
    pub(crate) confirmed: u64,
    /// Events seen by the `OrderService/*` handler.
    pub(crate) notes: u64,
    /// Events seen by the `*/*` handler.
    pub(crate) others: u64,
    /// The engine's totals.
    pub(crate) totals: MetricsSnapshot,
}

/// How often each handler ran.
#[derive(Debug, Default)]
struct Counters {
    confirmed: AtomicU64,
    notes: AtomicU64,
    others: AtomicU64,
}

fn main() -> ExitCode {
    let orders = std::env::var("ORDERS").ok().and_then(|n| n.parse().ok()).unwrap_or(5);
    // The service's own runtime; the engine is one of its tasks.
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("embedded_service: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<Report, BoxError> = runtime.block_on(async {
        let (config, cluster) = database().await?;
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        let report = run(config, orders, ctrl_c).await;
        if let Some(cluster) = cluster {
            cluster.stop().await?;
        }
        report
    });
    match result {
        Ok(report) => {
            eprintln!(
                "embedded_service: run {}: {} orders confirmed, {} notes, {} other events; {}",
                report.run, report.confirmed, report.notes, report.others, report.totals
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("embedded_service: error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `DATABASE_URL`, else an embedded cluster under `./.hook-data` (as `hook-processor` does).
async fn database() -> Result<(Config, Option<EmbeddedCluster>), BoxError> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Ok((hook_store::parse_database_url(&url)?, None));
    }
    let cluster = EmbeddedCluster::start(ClusterOptions {
        data_dir: std::env::current_dir()?.join(".hook-data"),
        database: "hook_events".into(),
        durable: true,
        max_connections: 100,
    })
    .await?;
    Ok((cluster.config("hook_events"), Some(cluster)))
}

/// Runs the service: places `orders` orders and processes their events until every one is
/// confirmed, or until `shutdown` completes; then stops every task and returns what happened.
pub(crate) async fn run(
    config: Config,
    orders: u64,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Report, BoxError> {
    let store = PgStore::connect(config, StoreOptions::default()).await?;
    store.migrate().await?;
    // The store's pool serves the service's own queries too.
    let pool = store.pool().clone();
    pool.get().await?.batch_execute(CREATE_ORDERS).await?;
    let run = Uuid::now_v7();

    let counters = Arc::new(Counters::default());
    let mut handlers = default_registry();
    // Exact route: confirm the order. The row is there, because it was committed with the event.
    let (confirm_pool, confirmed) = (pool.clone(), Arc::clone(&counters));
    handlers.register("OrderService", "order_placed", move |event: Arc<HookEvent>| {
        let (pool, counters) = (confirm_pool.clone(), Arc::clone(&confirmed));
        async move {
            let order: Uuid = event.resource_id.parse().map_err(|e| format!("bad order id: {e}"))?;
            let conn = pool.get().await.map_err(|e| e.to_string())?;
            let updated = conn
                .execute("UPDATE example_orders SET status = 'confirmed' WHERE id = $1", &[&order])
                .await
                .map_err(|e| e.to_string())?;
            if updated == 0 {
                return Err(format!("order {order} not found"));
            }
            counters.confirmed.fetch_add(1, Ordering::Relaxed);
            Ok(HandlerResult::ok("order confirmed").with("order_id", order.to_string()))
        }
    });
    // Source wildcard: every other OrderService event.
    let notes = Arc::clone(&counters);
    handlers.register("OrderService", "*", move |event: Arc<HookEvent>| {
        notes.notes.fetch_add(1, Ordering::Relaxed);
        async move { HandlerResult::ok(format!("noted {}", event.action)) }
    });
    // Global wildcard: anything no other route takes (replaces the default "unknown" handler).
    let others = Arc::clone(&counters);
    handlers.register("*", "*", move |event: Arc<HookEvent>| {
        others.others.fetch_add(1, Ordering::Relaxed);
        async move { HandlerResult::ok("seen").with("source", event.source.clone()) }
    });

    let engine = Engine::builder(store)
        .registry(handlers)
        .config(EngineConfig {
            poll_interval: Duration::from_millis(500),
            metrics_interval: None,
            ..EngineConfig::default()
        })
        .build()?;

    // One stop signal for every task.
    let (stop, stopped) = watch::channel(false);
    let processing = tokio::spawn(engine.run(until_stopped(stopped.clone())));
    let reporter = tokio::spawn(report_progress(pool.clone(), run, stopped));

    // The service's main work: take the orders, then wait until they are all confirmed.
    let work = async {
        place_orders(&pool, run, orders).await?;
        all_confirmed(&pool, run, orders).await
    };
    let finished = tokio::select! {
        () = shutdown => Ok(()),
        done = work => done,
    };
    let _ = stop.send(true);
    let totals = processing.await?;
    reporter.await?;
    finished?;
    Ok(Report {
        run,
        confirmed: counters.confirmed.load(Ordering::Relaxed),
        notes: counters.notes.load(Ordering::Relaxed),
        others: counters.others.load(Ordering::Relaxed),
        totals,
    })
}

/// Places the orders, one transaction each: the order row and its events commit together. The
/// last attempt fails its stock check and rolls back, leaving neither row nor event.
async fn place_orders(pool: &Pool, run: Uuid, orders: u64) -> Result<(), BoxError> {
    for n in 0..=orders {
        let mut conn = pool.get().await?;
        let tx = conn.transaction().await?;
        let order = Uuid::now_v7();
        let item = format!("tea #{n}");
        tx.execute("INSERT INTO example_orders (id, run, item) VALUES ($1, $2, $3)", &[&order, &run, &item])
            .await?;
        let placed = NewEvent::new("OrderService", "order_placed", "order", order.to_string())
            .with_payload(json!({"item": item}))
            .with_metadata(json!({"run": run}));
        enqueue(&tx, &placed).await?;
        // More events in the same transaction, in one statement.
        let follow_ups = [
            NewEvent::new("OrderService", "order_note", "order", order.to_string())
                .with_payload(json!({"note": "gift wrap"})),
            NewEvent::new("Billing", "invoice_requested", "order", order.to_string()),
        ];
        enqueue_many(&tx, &follow_ups).await?;
        if n == orders {
            // Out of stock: the order and its three events vanish together.
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Completes when all `orders` orders of `run` are confirmed.
async fn all_confirmed(pool: &Pool, run: Uuid, orders: u64) -> Result<(), BoxError> {
    loop {
        if confirmed_orders(pool, run).await? >= orders {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn confirmed_orders(pool: &Pool, run: Uuid) -> Result<u64, BoxError> {
    let conn = pool.get().await?;
    let row = conn
        .query_one("SELECT count(*) FROM example_orders WHERE run = $1 AND status = 'confirmed'", &[&run])
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0))?)
}

/// Another task of the service: logs progress every second until stopped.
async fn report_progress(pool: Pool, run: Uuid, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Ok(confirmed) = confirmed_orders(&pool, run).await {
                    eprintln!("embedded_service: {confirmed} orders confirmed so far");
                }
            }
            // The only change ever sent is the stop signal.
            _ = stopped.changed() => return,
        }
    }
}

/// Completes when the stop signal is sent (or its sender is gone).
async fn until_stopped(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}
