//! Test support: every test gets its own fresh database on a real PostgreSQL server.
//!
//! The server comes from, in order:
//! 1. `HOOK_TEST_DATABASE_URL`, a server URL (its database is used only to create test databases);
//! 2. a cluster this harness starts from the machine's PostgreSQL binaries, shared by all test
//!    processes of the user under `$TMPDIR/hook-events-test-<uid>` (built without fsync: a test
//!    cluster needs no durability), and stopped about a second after the last of them exits;
//! 3. with the `testcontainers` feature, a `postgres` container when a Docker engine answers
//!    (trust authentication: no password is involved);
//! 4. otherwise a panic saying what to install.
//!
//! Databases are named after the test and the process (`t_<test>_<pid>_<n>`), dropped when the
//! [`TestDb`] is dropped, kept when the test panicked (for debugging), and removed by the first
//! test of a later run once their process is gone.
//!
//! # Who stops the shared cluster
//!
//! Test binaries run one after another and side by side, and none knows whether it is the last.
//! Each one that uses the shared cluster holds a *shared* `flock` on `users.lock` in the cluster's
//! directory for as long as it lives (the kernel drops it when the process ends, however it ends).
//! The first of them also starts a small watchdog (`sh` and util-linux's `flock`, in a process
//! group of its own), which holds `watchdog.lock` and, twice a second, tries an *exclusive* lock
//! on `users.lock`: when it gets one twice in a row, no test process is left, so it stops the
//! server (SIGINT, a fast shutdown) while holding that lock, and exits. A test process starting
//! meanwhile waits for the lock, finds no watchdog, starts a new one and starts the server again.
//! The data directory is kept, so the next run skips `initdb`; `rm -rf
//! $TMPDIR/hook-events-test-$(id -u)` removes it. Without `flock` on `PATH` no watchdog runs and
//! the server stays up for the next run, as `pg_ctl -D $TMPDIR/hook-events-test-$(id -u)/pgdata
//! stop` would stop it.

use std::path::{Path, PathBuf};
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
    let dir = shared_cluster_dir();
    register_user(&dir).await?;
    let local = EmbeddedCluster::start(ClusterOptions {
        data_dir: dir,
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

/// This process's shared lock on the shared cluster's `users.lock`, held until it exits.
static USER_LOCK: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// What the watchdog runs: `$1` is the shared cluster's directory. Its children get neither of
/// its lock descriptors (8, 9), which would keep the locks alive.
const WATCHDOG: &str = r#"
dir="$1"
exec 8>>"$dir/watchdog.lock" || exit 0
flock -n 8 || exit 0
idle=0
while :; do
    sleep 0.5 8>&- 9>&-
    exec 9>>"$dir/users.lock" || exit 0
    if flock -n -x 9 8>&-; then
        idle=$((idle + 1))
        if [ "$idle" -ge 2 ]; then
            pid=$(head -n 1 "$dir/pgdata/postmaster.pid" 2>/dev/null)
            if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]; then
                kill -INT "$pid"
                n=0
                while [ -f "$dir/pgdata/postmaster.pid" ] && [ "$n" -lt 600 ]; do
                    sleep 0.1 8>&- 9>&-
                    n=$((n + 1))
                done
            fi
            exec 8>&-
            exit 0
        fi
        flock -u 9 8>&-
    else
        idle=0
    fi
    exec 9>&-
done
"#;

/// Marks this process as a user of the shared cluster under `dir` (see the module docs), and
/// makes sure a watchdog will stop the server once no user is left.
// `File::lock_shared` and `File::try_lock` are stable since Rust 1.89; the workspace's
// rust-version says 1.85.
#[allow(clippy::incompatible_msrv)]
async fn register_user(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;

    if USER_LOCK.get().is_some() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
    let open = |name: &str| {
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))
    };
    // Waits while a watchdog is stopping the server.
    let users = open("users.lock")?;
    let users = tokio::task::spawn_blocking(move || users.lock_shared().map(|()| users))
        .await
        .map_err(|e| StoreError::Config(format!("waiting for users.lock: {e}")))?
        .map_err(|e| StoreError::io("locking users.lock", e))?;
    let _ = USER_LOCK.set(users);
    let watchdog = open("watchdog.lock")?;
    match watchdog.try_lock() {
        Ok(()) => {
            drop(watchdog);
            let spawned = std::process::Command::new("sh")
                .arg("-c")
                .arg(WATCHDOG)
                .arg("hook-events-test-watchdog")
                .arg(dir)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .process_group(0)
                .spawn();
            if let Err(error) = spawned {
                tracing::warn!(%error, "no watchdog for the shared test cluster; it stays running");
            }
        }
        Err(std::fs::TryLockError::WouldBlock) => {} // one is running
        Err(std::fs::TryLockError::Error(e)) => return Err(StoreError::io("locking watchdog.lock", e)),
    }
    Ok(())
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

/// A PostgreSQL server that asks every role but its superuser for a password (`scram-sha-256`,
/// with `password_encryption = scram-sha-256`), started by the test that makes it, for tests of
/// how the binaries find passwords. It listens on a Unix socket only, like the embedded cluster
/// it is built on; its superuser `postgres` keeps `trust`, for the test's own setup.
///
/// Dropping it stops the server and removes its directory.
pub struct PasswordCluster {
    cluster: Option<EmbeddedCluster>,
    dir: PathBuf,
    /// The socket directory (the `host` of its connections).
    pub socket_dir: PathBuf,
    /// The port (which names the socket file).
    pub port: u16,
}

/// A role of a [`PasswordCluster`] with a database it owns.
#[derive(Debug, Clone)]
pub struct PasswordRole {
    /// The role's name, also its database's.
    pub user: String,
    /// Its password (with a `:` and a `\`, which a password file must escape).
    pub password: String,
    /// A directory to use as `HOME`, whose `.pgpass` (mode 0600) holds the password.
    pub home: PathBuf,
    /// A directory to use as `HOME`, whose `.pgpass` holds the password but is readable by
    /// group and others (mode 0644), so libpq's rule ignores it.
    pub open_home: PathBuf,
    socket_dir: PathBuf,
    port: u16,
}

impl PasswordRole {
    /// The role's database URL, without a password.
    pub fn url(&self) -> String {
        format!(
            "postgresql://{}@/{}?host={}&port={}",
            self.user,
            self.user,
            self.socket_dir.display(),
            self.port
        )
    }

    /// The role's database URL with `password` in it (percent-encoded).
    pub fn url_with_password(&self, password: &str) -> String {
        let encoded: String = password
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b == b'-' {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        format!(
            "postgresql://{}:{encoded}@/{}?host={}&port={}",
            self.user,
            self.user,
            self.socket_dir.display(),
            self.port
        )
    }

    /// The ways to give a binary this role's password, each a name and the variables to set
    /// (on top of [`binary_command`]'s clean environment; `HOME` and `PGPASSFILE` are always
    /// among them, so that no real password file is read): `DATABASE_URL` without a password plus `DB_PASSWORD`, plus
    /// `POSTGRES_PASSWORD`, plus `PGPASSWORD`; the `PG*` variables alone with `PGPASSWORD`;
    /// `DATABASE_URL` plus a `~/.pgpass` entry; plus `PGPASSFILE`.
    pub fn ways(&self) -> Vec<(&'static str, Vec<(String, String)>)> {
        let none = "/nonexistent/hook-events-test-pgpass".to_owned();
        let nowhere = self.home.join("no-home").display().to_string();
        let url = self.url();
        let pw = self.password.clone();
        let home = self.home.display().to_string();
        let passfile = self.home.join(".pgpass").display().to_string();
        let vars = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        vec![
            (
                "DATABASE_URL + DB_PASSWORD",
                vars(&[
                    ("DATABASE_URL", &url),
                    ("DB_PASSWORD", &pw),
                    ("HOME", &nowhere),
                    ("PGPASSFILE", &none),
                ]),
            ),
            (
                "DATABASE_URL + POSTGRES_PASSWORD",
                vars(&[
                    ("DATABASE_URL", &url),
                    ("POSTGRES_PASSWORD", &pw),
                    ("HOME", &nowhere),
                    ("PGPASSFILE", &none),
                ]),
            ),
            (
                "DATABASE_URL + PGPASSWORD",
                vars(&[
                    ("DATABASE_URL", &url),
                    ("PGPASSWORD", &pw),
                    ("HOME", &nowhere),
                    ("PGPASSFILE", &none),
                ]),
            ),
            (
                "PGHOST, PGPORT, PGUSER, PGDATABASE + PGPASSWORD",
                vars(&[
                    ("PGHOST", &self.socket_dir.display().to_string()),
                    ("PGPORT", &self.port.to_string()),
                    ("PGUSER", &self.user),
                    ("PGDATABASE", &self.user),
                    ("PGPASSWORD", &pw),
                    ("HOME", &nowhere),
                    ("PGPASSFILE", &none),
                ]),
            ),
            // An empty PGPASSFILE counts as unset: the file is $HOME/.pgpass.
            (
                "DATABASE_URL + ~/.pgpass",
                vars(&[("DATABASE_URL", &url), ("HOME", &home), ("PGPASSFILE", "")]),
            ),
            (
                "DATABASE_URL + PGPASSFILE",
                vars(&[("DATABASE_URL", &url), ("PGPASSFILE", &passfile), ("HOME", &nowhere)]),
            ),
        ]
    }

    /// Variables that give a wrong password (`DATABASE_URL` plus `PGPASSWORD`).
    pub fn wrong(&self, password: &str) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".to_owned(), self.url()),
            ("PGPASSWORD".to_owned(), password.to_owned()),
            ("HOME".to_owned(), self.home.join("no-home").display().to_string()),
            ("PGPASSFILE".to_owned(), "/nonexistent/hook-events-test-pgpass".to_owned()),
        ]
    }
}

impl PasswordCluster {
    /// Creates and starts the cluster under the temporary directory.
    ///
    /// # Panics
    /// When the server cannot be set up.
    pub async fn start(tag: &str) -> PasswordCluster {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hook-events-pw-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let cluster = EmbeddedCluster::start(ClusterOptions {
            data_dir: dir.join("cluster"),
            database: "postgres".into(),
            durable: false,
            max_connections: 50,
        })
        .await
        .unwrap_or_else(|e| panic!("start a password-protected test cluster: {e}"));
        let admin = cluster.config("postgres");
        let socket_dir = match admin.get_hosts().first() {
            Some(tokio_postgres::config::Host::Unix(path)) => path.clone(),
            _ => panic!("the embedded cluster listens on a socket"),
        };
        let port = admin.get_ports().first().copied().unwrap_or(5432);
        // From here on, a panic stops the server (the guard's drop).
        let this = PasswordCluster { cluster: Some(cluster), dir, socket_dir, port };
        let client = connect(&admin).await.expect("connect to the password test cluster");
        let hba: String = client.query_one("SHOW hba_file", &[]).await.expect("hba_file").get(0);
        std::fs::write(
            &hba,
            "# hook-events test cluster: passwords for everyone but the superuser\n\
             local all postgres trust\n\
             local all all scram-sha-256\n",
        )
        .expect("write pg_hba.conf");
        for sql in ["ALTER SYSTEM SET password_encryption = 'scram-sha-256'", "SELECT pg_reload_conf()"] {
            client.batch_execute(sql).await.expect("reconfigure the server");
        }
        // The reload is asynchronous: wait until a role without a password is turned away.
        let probe = this.role("probe").await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let mut config = Config::new();
            config.host_path(&this.socket_dir).port(this.port).user(&probe.user).dbname(&probe.user);
            match config.connect(NoTls).await {
                Err(error) if error.to_string().contains("invalid configuration") => break,
                _ if std::time::Instant::now() > deadline => panic!("pg_hba.conf was not reloaded"),
                _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
        this
    }

    /// Creates the role `name` (`LOGIN`, a fresh password stored as SCRAM) and a database of
    /// the same name that it owns, and writes its password files.
    ///
    /// # Panics
    /// When the role cannot be created.
    pub async fn role(&self, name: &str) -> PasswordRole {
        let cluster = self.cluster.as_ref().expect("running");
        let client = connect(&cluster.config("postgres")).await.expect("connect as the superuser");
        let password = format!("pw:{}\\x", uuid::Uuid::new_v4().simple());
        let literal = password.replace('\'', "''");
        for sql in [
            "SET password_encryption = 'scram-sha-256'".to_owned(),
            format!("CREATE ROLE \"{name}\" LOGIN PASSWORD '{literal}'"),
            format!("CREATE DATABASE \"{name}\" OWNER \"{name}\""),
        ] {
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("create role {name}: {}", StoreError::from(e)));
        }
        let stored: String = client
            .query_one("SELECT rolpassword FROM pg_authid WHERE rolname = $1", &[&name])
            .await
            .expect("read the stored password")
            .get(0);
        assert!(stored.starts_with("SCRAM-SHA-256$"), "the password is stored as SCRAM");
        let escaped = password.replace('\\', "\\\\").replace(':', "\\:");
        let line = format!(
            "# the test role {name}\n*:*:other:*:wrong\n{}:{}:{name}:{name}:{escaped}\n",
            self.socket_dir.display(),
            self.port
        );
        let write = |home: &Path, mode: u32| {
            std::fs::create_dir_all(home).expect("create a home directory");
            let path = home.join(".pgpass");
            std::fs::write(&path, &line).expect("write .pgpass");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .expect("chmod .pgpass");
        };
        let home = self.dir.join(format!("home-{name}"));
        let open_home = self.dir.join(format!("open-home-{name}"));
        write(&home, 0o600);
        write(&open_home, 0o644);
        PasswordRole {
            user: name.to_owned(),
            password,
            home,
            open_home,
            socket_dir: self.socket_dir.clone(),
            port: self.port,
        }
    }
}

impl Drop for PasswordCluster {
    fn drop(&mut self) {
        let Some(cluster) = self.cluster.take() else { return };
        let dir = self.dir.clone();
        // Drop may run inside a runtime; stop the server from a thread with its own.
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                let _ = runtime.block_on(cluster.stop_server());
            }
            let _ = std::fs::remove_dir_all(&dir);
        })
        .join();
    }
}

/// Stops, at once (SIGQUIT: an immediate shutdown), every PostgreSQL server whose data directory
/// is somewhere under `dir`, going by the `postmaster.pid` files there. For scratch directories
/// of tests that start clusters of their own: called from a `Drop`, it leaves no server running
/// when a test fails half way.
pub fn stop_servers_under(dir: &Path) {
    fn walk(dir: &Path, depth: usize, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name() == "postmaster.pid" {
                found.push(path);
            } else if depth < 4 && entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&path, depth + 1, found);
            }
        }
    }
    let mut pid_files = Vec::new();
    walk(dir, 0, &mut pid_files);
    for pid_file in pid_files {
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.lines().next().and_then(|line| line.trim().parse::<i32>().ok()));
        let Some(pid) = pid else { continue };
        let is_postgres =
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres");
        if !is_postgres {
            continue;
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGQUIT);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while pid_file.exists() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// The one line a refused run of `program` printed, after checking that its stderr is exactly
/// one line, `<program>: error: ...`, without a panic; with its exit code.
///
/// # Panics
/// When stderr is not one such line.
pub fn error_line(program: &str, output: &std::process::Output) -> (Option<i32>, String) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{program}: stderr is not one line:\n{stderr}");
    assert!(lines[0].starts_with(&format!("{program}: error: ")), "{program}: not an error line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    (output.status.code(), lines[0].to_owned())
}
