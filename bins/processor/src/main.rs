//! `hook-processor`: claims rows of `hook_events`, routes each to its handler, retries failures
//! with backoff and records the outcome. With no database configured it runs on an embedded
//! PostgreSQL cluster under `--data-dir`.

mod config;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use hook_core::{default_registry, Engine};
use hook_store::{redacted, EmbeddedCluster, PgStore, StoreOptions};
use tracing::info;

use crate::config::{Args, Database};

fn main() -> ExitCode {
    // A missing .env is normal; a malformed one is an error worth stopping for.
    if let Err(error) = dotenvy::dotenv() {
        if !error.not_found() {
            eprintln!("hook-processor: error: reading .env: {error}");
            return ExitCode::from(2);
        }
    }
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hook-processor: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    config::init_logging(&args)?;
    let engine_config = args.engine_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let (pg_config, cluster) = match args.database()? {
            Database::Configured(config) => (config, None),
            Database::Embedded(options) => {
                let dir = options.data_dir.clone();
                let cluster = EmbeddedCluster::start(options)
                    .await
                    .with_context(|| format!("starting the embedded PostgreSQL under {}", dir.display()))?;
                info!(url = %cluster.url("hook_events"), "embedded PostgreSQL ready; insert events with: psql \"{}\"", cluster.url("hook_events"));
                (cluster.config("hook_events"), Some(cluster))
            }
        };
        let result = process(pg_config, engine_config).await;
        if let Some(cluster) = cluster {
            cluster.stop().await.context("stopping the embedded PostgreSQL")?;
        }
        result
    })
}

async fn process(
    pg_config: hook_store::tokio_postgres::Config,
    engine_config: hook_core::EngineConfig,
) -> anyhow::Result<()> {
    let pg_config = hook_store::with_service_defaults(pg_config, "hook-processor");
    let shown = redacted(&pg_config);
    let options = StoreOptions { pool_size: engine_config.batches_in_flight + 2, ..StoreOptions::default() };
    let store =
        PgStore::connect(pg_config, options).await.with_context(|| format!("connecting to {shown}"))?;
    let report = store.migrate().await.with_context(|| format!("migrating {shown}"))?;
    info!(database = %shown, applied = ?report.applied, "database ready");
    let engine = Engine::builder(store).registry(default_registry()).config(engine_config).build()?;
    engine.run(shutdown_signal()).await;
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
}
