//! `hook-console`: the hook-events web console on its own, against a database, for an
//! operator's laptop. Read-only unless `HOOK_CONSOLE_TOKEN` (or `HOOK_CONSOLE_TOKEN_FILE`) is
//! set; binds the loopback address by default. The pages are hook-console's
//! ([`hook_console::router`]); this binary parses flags, connects and serves.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use hook_cli::{DatabaseFlags, UsageError};
use hook_console::{ConsoleConfig, ConsoleState, Token};
use tracing::info;

const PROGRAM: &str = "hook-console";

/// Serve the hook-events web console.
#[derive(Debug, Parser)]
#[command(name = PROGRAM, version, about)]
struct Args {
    #[command(flatten)]
    database: DatabaseFlags,

    /// Address to serve on. Keep it on loopback unless a proxy with authentication is in front:
    /// every page shows event payloads.
    #[arg(long, env = "HOOK_CONSOLE_ADDR", default_value = "127.0.0.1:9478")]
    listen: SocketAddr,

    /// Log level or filter (error, warn, info, debug, trace, or target=level,...).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    if let Err(code) = hook_cli::load_dotenv(PROGRAM) {
        return code;
    }
    let args = Args::parse();
    hook_cli::exit_code(PROGRAM, run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    hook_cli::init_logging(&args.log_level, false)?;
    let token = match hook_cli::console_token()? {
        Some(text) => Some(Token::new(&text).map_err(|e| UsageError(e.to_string()))?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let connected = hook_cli::connect(&args.database, PROGRAM).await?;
        let writable = token.is_some();
        let state = ConsoleState::new(
            connected.store.pool().clone(),
            ConsoleConfig { token, ..ConsoleConfig::default() },
        );
        // Beside serving: on a large table the build takes minutes.
        let pool = connected.store.pool().clone();
        tokio::spawn(async move { hook_console::build_indexes(&pool).await });
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let local = listener.local_addr().unwrap_or(args.listen);
        info!(
            database = %connected.shown,
            mode = if writable { "actions enabled (token set)" } else { "read-only" },
            "serving the console on http://{local}/"
        );
        axum::serve(listener, hook_console::router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving the console")?;
        connected.close().await
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
