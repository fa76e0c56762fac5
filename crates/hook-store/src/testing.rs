//! Test support: every test gets its own fresh database on a real PostgreSQL server.
//!
//! The server comes from, in order:
//! 1. `HOOK_TEST_DATABASE_URL`, a server URL (its database is used only to create test databases);
//! 2. a cluster this harness starts from the machine's PostgreSQL binaries, shared by all test
//!    processes of the user under `$TMPDIR/hook-events-test-<uid>` and left running for reuse
//!    (built without fsync: a test cluster needs no durability);
//! 3. with the `testcontainers` feature, a `postgres` container when a Docker engine answers
//!    (trust authentication: no password is involved);
//! 4. otherwise a panic saying what to install.
//!
//! Databases are named after the test and the process (`t_<test>_<pid>_<n>`), dropped when the
//! [`TestDb`] is dropped, kept when the test panicked (for debugging), and removed by the first
//! test of a later run once their process is gone.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::OnceCell;
use tokio_postgres::{Client, Config, NoTls};

use crate::{ClusterOptions, EmbeddedCluster, PgStore, StoreError, StoreOptions};

static SERVER: OnceCell<Config> = OnceCell::const_new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The admin connection settings of the test server, starting it on first use.
///
/// # Panics
/// When no server can be had, with a message that says what to install.
pub async fn server() -> Config {
    SERVER
        .get_or_init(|| async {
            let config = match start_server().await {
                Ok(config) => config,
                Err(error) => panic!(
                    "no PostgreSQL for the tests: {error}\n\
                     set HOOK_TEST_DATABASE_URL to a server URL, or install the PostgreSQL server \
                     binaries (e.g. `apt-get install postgresql`)"
                ),
            };
            if let Err(error) = drop_stale_databases(&config).await {
                tracing::warn!(%error, "could not drop stale test databases");
            }
            config
        })
        .await
        .clone()
}

/// The data directory of the shared test cluster.
pub fn shared_cluster_dir() -> PathBuf {
    std::env::temp_dir().join(format!("hook-events-test-{}", nix::unistd::geteuid()))
}

async fn start_server() -> Result<Config, StoreError> {
    if let Ok(url) = std::env::var("HOOK_TEST_DATABASE_URL") {
        return crate::parse_database_url(&url);
    }
    let local = EmbeddedCluster::start(ClusterOptions {
        data_dir: shared_cluster_dir(),
        database: "postgres".into(),
        durable: false,
        max_connections: 400,
    })
    .await;
    match local {
        Ok(cluster) => Ok(cluster.config("postgres")),
        Err(StoreError::NoPostgresBinaries) => container().await,
        Err(other) => Err(other),
    }
}

#[cfg(feature = "testcontainers")]
async fn container() -> Result<Config, StoreError> {
    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt};

    // Kept for the life of the test process; the container is removed by testcontainers' reaper.
    static CONTAINER: OnceCell<ContainerAsync<Postgres>> = OnceCell::const_new();
    let unavailable = |e: &dyn std::fmt::Display| {
        StoreError::Config(format!(
            "no PostgreSQL server binaries on this machine, and no Docker engine for a container ({e})"
        ))
    };
    let container = CONTAINER
        .get_or_try_init(|| async {
            Postgres::default()
                .with_host_auth()
                .with_cmd(["postgres", "-c", "max_connections=400"])
                .start()
                .await
        })
        .await
        .map_err(|e| unavailable(&e))?;
    let host = container.get_host().await.map_err(|e| unavailable(&e))?;
    let port = container.get_host_port_ipv4(5432).await.map_err(|e| unavailable(&e))?;
    let mut config = Config::new();
    config.host(host.to_string()).port(port).user("postgres").dbname("postgres");
    Ok(config)
}

#[cfg(not(feature = "testcontainers"))]
async fn container() -> Result<Config, StoreError> {
    Err(StoreError::NoPostgresBinaries)
}

async fn connect(config: &Config) -> Result<Client, StoreError> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn drop_stale_databases(admin: &Config) -> Result<(), StoreError> {
    let client = connect(admin).await?;
    let rows = client.query("SELECT datname FROM pg_database WHERE datname LIKE 't\\_%'", &[]).await?;
    for row in rows {
        let name: String = row.get(0);
        let pid = name.rsplit('_').nth(1).and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|pid| PathBuf::from(format!("/proc/{pid}")).exists());
        if !alive {
            client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await?;
        }
    }
    Ok(())
}

/// A fresh database owned by one test.
pub struct TestDb {
    /// The database's name.
    pub name: String,
    admin: Config,
    config: Config,
}

impl TestDb {
    /// Creates an empty database (no tables) for the test named `test`.
    ///
    /// # Panics
    /// When the server cannot be had or the database cannot be created.
    pub async fn empty(test: &str) -> TestDb {
        let admin = server().await;
        let slug: String = test
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .take(36)
            .collect();
        let name = format!("t_{slug}_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let client = connect(&admin).await.expect("connect to the test server");
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("create test database {name}: {e}"));
        let mut config = admin.clone();
        config.dbname(&name);
        TestDb { name, admin, config }
    }

    /// Creates a database with every migration applied.
    ///
    /// # Panics
    /// As [`empty`](Self::empty), or when a migration fails.
    pub async fn migrated(test: &str) -> TestDb {
        let db = Self::empty(test).await;
        let client = db.client().await;
        crate::migrate::migrate(&client).await.expect("migrate the test database");
        db
    }

    /// The database's connection settings.
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// A URL for the database (for child processes).
    pub fn url(&self) -> String {
        config_to_url(&self.config)
    }

    /// A new connection to the database.
    ///
    /// # Panics
    /// When the connection fails.
    pub async fn client(&self) -> Client {
        connect(&self.config).await.expect("connect to the test database")
    }

    /// A [`PgStore`] on the database.
    ///
    /// # Panics
    /// When the connection fails.
    pub async fn store(&self, options: StoreOptions) -> PgStore {
        PgStore::connect(self.config.clone(), options).await.expect("connect the store")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping test database {} for debugging", self.name);
            return;
        }
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop may run inside a runtime; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async move {
                if let Ok(client) = connect(&admin).await {
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .await;
                }
            });
            Ok::<(), std::io::Error>(())
        })
        .join();
    }
}

pub use crate::children::binary_command;
pub use crate::proxy::SilentProxy;

/// A `key=value` connection string for `config` (including any password: for tests only).
pub fn config_to_url(config: &Config) -> String {
    use tokio_postgres::config::Host;
    let mut parts = Vec::new();
    if let Some(host) = config.get_hosts().first() {
        match host {
            Host::Tcp(h) => parts.push(format!("host={h}")),
            Host::Unix(p) => parts.push(format!("host={}", p.display())),
        }
    }
    if let Some(port) = config.get_ports().first() {
        parts.push(format!("port={port}"));
    }
    if let Some(user) = config.get_user() {
        parts.push(format!("user={user}"));
    }
    if let Some(password) = config.get_password() {
        parts.push(format!("password={}", String::from_utf8_lossy(password)));
    }
    if let Some(db) = config.get_dbname() {
        parts.push(format!("dbname={db}"));
    }
    parts.join(" ")
}
