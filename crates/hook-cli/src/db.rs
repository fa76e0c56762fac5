//! Which database, and connecting to it, the way `hook-processor` chooses: `DATABASE_URL`, else
//! the original service's `POSTGRES_*` variables, else libpq's `PGHOST`, else the processor's
//! embedded cluster when one exists under `--data-dir` (this tool never creates one). Passwords
//! and what the chosen source leaves open follow libpq ([`hook_store::LibpqEnv`]).

use std::path::PathBuf;

use anyhow::Context;
use hook_store::{
    redacted, ClusterOptions, DatabaseArgs, EmbeddedCluster, LibpqEnv, PasswordSource, PgStore, Resolved,
    StoreOptions,
};

use crate::UsageError;

/// The connection flags, shared with `hook-processor`'s names and variables.
#[derive(Debug, clap::Args)]
pub struct DatabaseFlags {
    /// PostgreSQL connection URL (postgres://user@host:port/db) or key=value string.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,

    /// Database host when DATABASE_URL is not set [default: localhost].
    #[arg(long, env = "POSTGRES_HOST")]
    postgres_host: Option<String>,

    /// Database port when DATABASE_URL is not set [default: 5436].
    #[arg(long, env = "POSTGRES_PORT")]
    postgres_port: Option<u16>,

    /// Database name when DATABASE_URL is not set [default: omninode_bridge].
    #[arg(long, env = "POSTGRES_DB")]
    postgres_db: Option<String>,

    /// Database user when DATABASE_URL is not set [default: postgres].
    #[arg(long, env = "POSTGRES_USER")]
    postgres_user: Option<String>,

    /// Directory of hook-processor's embedded cluster, used when no database is configured.
    #[arg(long, env = "HOOK_DATA_DIR", default_value = ".hook-data")]
    data_dir: PathBuf,
}

/// A connected, migrated store, and the embedded cluster it runs on, if any.
pub struct Connected {
    /// The store (no LISTEN connection; a small pool).
    pub store: PgStore,
    /// The database, redacted, for messages.
    pub shown: String,
    cluster: Option<EmbeddedCluster>,
}

impl Connected {
    /// Closes the pool and stops the embedded cluster if this process started it.
    pub async fn close(self) -> anyhow::Result<()> {
        drop(self.store);
        if let Some(cluster) = self.cluster {
            cluster.stop().await.context("stopping the embedded PostgreSQL")?;
        }
        Ok(())
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// libpq's variables and password file, from this process's environment.
pub fn libpq_env() -> LibpqEnv {
    LibpqEnv::from_vars(|name| std::env::var(name).ok())
}

/// The server the arguments (and `DB_PASSWORD`/`POSTGRES_PASSWORD`, and libpq's variables) name,
/// if any. A mistake in them is a [`UsageError`]; warnings (an unsafe password file) are printed
/// as `<program>: warning: ...` lines.
pub fn resolve_database(program: &str, args: &DatabaseArgs) -> anyhow::Result<Option<Resolved>> {
    let resolved = args.resolve_with(&libpq_env()).map_err(|e| UsageError(e.to_string()))?;
    for warning in resolved.iter().flat_map(|r| &r.warnings) {
        eprintln!("{program}: warning: {warning}");
    }
    Ok(resolved)
}

/// What a failed connection's message says it was connecting to: the redacted URL, and where the
/// password came from when there was one (`postgresql://app@db:5432/events (password from
/// PGPASSWORD)`), so that "password authentication failed" says which password to fix.
pub fn connecting_to(shown: &str, password: &PasswordSource) -> String {
    match password {
        PasswordSource::None => format!("connecting to {shown}"),
        source => format!("connecting to {shown} ({source})"),
    }
}

/// Connects to the chosen database and applies pending migrations.
pub async fn connect(flags: &DatabaseFlags, application: &str) -> anyhow::Result<Connected> {
    let args = DatabaseArgs {
        url: flags.database_url.clone(),
        host: flags.postgres_host.clone(),
        port: flags.postgres_port,
        database: flags.postgres_db.clone(),
        user: flags.postgres_user.clone(),
        password: env_nonempty("DB_PASSWORD").or_else(|| env_nonempty("POSTGRES_PASSWORD")),
    };
    let (config, password, cluster) = match resolve_database(application, &args)? {
        Some(resolved) => (resolved.config, resolved.password, None),
        None => {
            let data_dir = if flags.data_dir.is_absolute() {
                flags.data_dir.clone()
            } else {
                std::env::current_dir().context("reading the working directory")?.join(&flags.data_dir)
            };
            if !data_dir.join("pgdata/PG_VERSION").is_file() {
                return Err(UsageError(format!(
                    "no database configured: set DATABASE_URL (or POSTGRES_HOST, POSTGRES_DB, \
                     POSTGRES_USER and DB_PASSWORD, or libpq's PGHOST), or point --data-dir at \
                     hook-processor's embedded cluster (none under {})",
                    data_dir.display()
                ))
                .into());
            }
            let options = ClusterOptions {
                data_dir,
                database: "hook_events".into(),
                durable: true,
                max_connections: 100,
            };
            let dir = options.data_dir.clone();
            let cluster = EmbeddedCluster::start(options)
                .await
                .with_context(|| format!("starting the embedded PostgreSQL under {}", dir.display()))?;
            (cluster.config("hook_events"), PasswordSource::None, Some(cluster))
        }
    };
    let config = hook_store::with_service_defaults(config, application);
    let shown = redacted(&config);
    let options = StoreOptions {
        pool_size: 2,
        listen: false,
        tls_root_cert: crate::tls_root_cert(),
        ..StoreOptions::default()
    };
    let store = PgStore::connect(config, options).await.with_context(|| connecting_to(&shown, &password))?;
    store.migrate().await.with_context(|| format!("migrating {shown}"))?;
    Ok(Connected { store, shown, cluster })
}
