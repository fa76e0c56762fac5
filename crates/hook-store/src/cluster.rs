//! An embedded PostgreSQL cluster, run from the machine's own server binaries.
//!
//! The processor (when no `DATABASE_URL` is given) and the test harness need a PostgreSQL server
//! without asking anyone to set one up. [`EmbeddedCluster::start`] creates one with `initdb` on
//! first use, starts it with `pg_ctl`, or reuses it if it is already running, and creates the
//! application's database. Nothing is downloaded: [`PgBinaries::find`] looks for the server
//! programs the machine already has.
//!
//! # Layout
//!
//! Everything lives under one directory we own, [`ClusterOptions::data_dir`]:
//!
//! | path            | what                                                            |
//! |-----------------|-----------------------------------------------------------------|
//! | `pgdata/`       | the cluster itself (`initdb -D`)                                |
//! | `run/`          | the unix socket directory (mode 0700)                           |
//! | `postgres.log`  | the server log (`pg_ctl -l`)                                    |
//! | `.lock`         | held while a process creates or starts the cluster              |
//! | `socket_dir`    | which socket directory the running server uses                  |
//!
//! # Why it is built this way
//!
//! - **Unix socket only.** The server runs with `listen_addresses=''` and its socket in a private
//!   directory, so it opens no TCP port: it cannot collide with another server on 5432, and no other
//!   local user can connect even though authentication is `trust` (there is no password to leak).
//!   Unix socket paths are limited to about 100 bytes; when `run/.s.PGSQL.5432` would be longer
//!   (deep data directories), the socket goes to a private `/tmp/hook-events-<hash>` directory
//!   instead, and the choice is written to `socket_dir` so that a process reusing the server finds it.
//! - **Never as root.** PostgreSQL refuses to run as root, yet containers and CI usually do. When
//!   this process is root, `initdb` and `pg_ctl` run as the unprivileged `postgres` account and the
//!   directories the server writes are given to it. Because that account must be able to reach the
//!   data directory, a directory under e.g. `/root` is refused up front with a clear message rather
//!   than a confusing `initdb` failure.
//! - **One starter at a time.** Parallel test binaries start the same cluster at the same moment. An
//!   exclusive lock on `.lock` around "initdb if needed, start if not running, create the database"
//!   makes exactly one of them do the work; the others wait, then find the server running and reuse
//!   it ([`EmbeddedCluster::started_here`] is then false, and [`EmbeddedCluster::stop`] leaves it
//!   running).
//! - **Fast when it may lose data.** Test clusters set `durable: false`: `initdb --no-sync` and
//!   `fsync`, `synchronous_commit` and `full_page_writes` off. A crash can then corrupt the
//!   cluster, which is fine for throwaway data and makes tests several times faster.
//!
//! Dropping an [`EmbeddedCluster`] does not stop the server (stopping needs to wait for a
//! process, which `Drop` cannot do well); call [`EmbeddedCluster::stop`]. A server left running
//! is simply reused by the next [`EmbeddedCluster::start`].

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::error::StoreError;

/// The port the server uses; it only names the socket file, since no TCP port is opened.
const PORT: u16 = 5432;
/// The database superuser `initdb` creates, and the one we connect as.
const SUPERUSER: &str = "postgres";
/// The unprivileged account the server runs as when this process is root.
const SERVER_ACCOUNT: &str = "postgres";
/// Longest socket file path we use; the kernel's limit is 107 bytes.
const MAX_SOCKET_PATH: usize = 100;
/// How long `pg_ctl` waits for the server to start or stop (`pg_ctl -t`).
const PG_CTL_WAIT_SECS: u64 = 60;
/// How long `initdb` may take (durable clusters sync every file).
const INITDB_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the first connection may keep failing after the server is up.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
/// How many lines of `postgres.log` an error includes.
const LOG_TAIL_LINES: usize = 5;

const ROOT_WITHOUT_ACCOUNT: &str = "running as root: PostgreSQL needs an unprivileged account \
                                    named postgres; create one or run as a normal user";

/// Where the PostgreSQL server programs (`initdb`, `pg_ctl`, `postgres`) are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    /// The directory holding `initdb`, `pg_ctl` and `postgres`.
    pub bindir: PathBuf,
}

impl PgBinaries {
    /// Finds `initdb`, `pg_ctl` and `postgres`: on `PATH` (in the first directory holding both
    /// `initdb` and `pg_ctl`, following symlinks to where `postgres` is too), else in
    /// `pg_config --bindir`, else in the highest version under `/usr/lib/postgresql/*/bin`.
    ///
    /// Returns [`StoreError::NoPostgresBinaries`] when none of these has all three programs.
    pub fn find() -> Result<Self, StoreError> {
        Self::on_path()
            .or_else(Self::from_pg_config)
            .or_else(|| highest_versioned_bindir(Path::new("/usr/lib/postgresql")))
            .map(|bindir| PgBinaries { bindir })
            .ok_or(StoreError::NoPostgresBinaries)
    }

    fn on_path() -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).find_map(|dir| {
            let initdb = dir.join("initdb");
            if !(is_executable(&initdb) && is_executable(&dir.join("pg_ctl"))) {
                return None;
            }
            // `/usr/local/bin/initdb` is often a symlink into `/usr/lib/postgresql/<v>/bin`, the
            // only place where `postgres` is; `pg_ctl` looks for it next to its real path too.
            let resolved =
                fs::canonicalize(&initdb).ok().and_then(|real| real.parent().map(Path::to_path_buf));
            resolved.into_iter().chain(Some(dir)).find(|candidate| has_server_programs(candidate))
        })
    }

    fn from_pg_config() -> Option<PathBuf> {
        let output = std::process::Command::new("pg_config")
            .arg("--bindir")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        let dir = PathBuf::from(OsStr::from_bytes(output.stdout.trim_ascii()));
        has_server_programs(&dir).then_some(dir)
    }

    fn program(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.mode() & 0o111 != 0)
}

fn has_server_programs(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"].iter().all(|name| is_executable(&dir.join(name)))
}

/// The `bin` directory of the highest version under `root` (`root/15/bin`, `root/9.6/bin`, ...).
fn highest_versioned_bindir(root: &Path) -> Option<PathBuf> {
    fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = parse_version(entry.file_name().to_str()?)?;
            let bindir = entry.path().join("bin");
            has_server_programs(&bindir).then_some((version, bindir))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bindir)| bindir)
}

fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// How to create and run an [`EmbeddedCluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The directory the cluster lives in, created if missing (e.g. `./.hook-data`); made absolute.
    pub data_dir: PathBuf,
    /// The database created if missing (e.g. `hook_events`).
    pub database: String,
    /// Whether committed data must survive a crash. `false` (for tests) turns off `fsync`,
    /// `synchronous_commit` and `full_page_writes` and runs `initdb --no-sync`.
    pub durable: bool,
    /// The server's `max_connections` (e.g. 100 for the processor, 300 for tests).
    pub max_connections: u32,
}

/// The unprivileged account the server runs as when this process is root.
#[derive(Debug, Clone)]
struct Account {
    uid: u32,
    gid: u32,
    home: PathBuf,
}

/// A PostgreSQL server under a directory we own, reachable only through a unix socket.
///
/// The directory holds the cluster (`pgdata/`), the socket directory (`run/`, or a private
/// `/tmp/hook-events-<hash>` when that path would be too long for a socket), the server log
/// (`postgres.log`) and a lock file. No TCP port is opened, so the server collides with no other
/// and only the socket directory's owner can connect; authentication is `trust` and no password
/// exists. When this process is root, the server runs as the unprivileged `postgres` account.
///
/// Several processes may [`start`](Self::start) the same directory at once: one creates and
/// starts the server under the lock, the others reuse it. Dropping the value leaves the server
/// running (the next `start` reuses it); [`stop`](Self::stop) stops it if this process started it.
#[derive(Debug)]
pub struct EmbeddedCluster {
    /// The options, with `data_dir` absolute and free of symlinks.
    options: ClusterOptions,
    binaries: PgBinaries,
    /// `Some` when this process is root and the server runs as another account.
    account: Option<Account>,
    socket_dir: PathBuf,
    port: u16,
    started_here: AtomicBool,
}

impl EmbeddedCluster {
    /// Creates (with `initdb` on first use), starts (with `pg_ctl`) or reuses an already running
    /// cluster under `options.data_dir`, and creates `options.database` if it is missing.
    ///
    /// Several processes may call this for the same directory at once: one of them creates and
    /// starts the server while the others wait, then reuse it.
    pub async fn start(options: ClusterOptions) -> Result<Self, StoreError> {
        let begun = Instant::now();
        validate(&options)?;
        let binaries = PgBinaries::find()?;
        let account = server_account(&options.data_dir)?;
        let data_dir = prepare_data_dir(&options.data_dir, account.as_ref())?;
        let _lock = lock_data_dir(&data_dir).await?;

        let mut cluster = EmbeddedCluster {
            socket_dir: socket_dir_for(&data_dir),
            options: ClusterOptions { data_dir, ..options },
            binaries,
            account,
            port: PORT,
            started_here: AtomicBool::new(false),
        };
        let data_dir = cluster.options.data_dir.display().to_string();
        if !cluster.pgdata().join("PG_VERSION").is_file() {
            cluster.initdb().await?;
        }
        if cluster.server_running().await? {
            cluster.adopt_running_server();
            tracing::info!(
                data_dir,
                socket_dir = %cluster.socket_dir.display(),
                "reusing running embedded PostgreSQL"
            );
        } else {
            cluster.launch().await?;
            cluster.started_here.store(true, Ordering::SeqCst);
        }

        if let Err(error) = cluster.create_database_if_missing().await {
            if cluster.started_here() {
                // Don't leave a server behind that the caller has no handle to stop.
                if let Err(stop_error) = cluster.pg_ctl_stop().await {
                    tracing::warn!(data_dir, error = %stop_error, "could not stop embedded PostgreSQL");
                }
            }
            return Err(error);
        }
        tracing::info!(
            data_dir,
            database = cluster.options.database,
            started_here = cluster.started_here(),
            elapsed_ms = begun.elapsed().as_millis() as u64,
            "embedded PostgreSQL ready"
        );
        Ok(cluster)
    }

    /// The connection settings for `database` on this cluster: user `postgres`, the socket
    /// directory as host, and the port (which only names the socket file).
    pub fn config(&self, database: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .user(SUPERUSER)
            .dbname(database)
            .host_path(&self.socket_dir)
            .port(self.port)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// The connection settings for `database` on the cluster under `data_dir` when its server is
    /// running, read from its `postmaster.pid` without starting, locking or waiting for anything;
    /// `None` when no server is running there. For short-lived producers (`hook-ingest`) that
    /// must neither start a server nor wait for one. A stale `postmaster.pid` (after a crash)
    /// yields settings whose connection then fails at once.
    pub fn running_config(data_dir: &Path, database: &str) -> Option<tokio_postgres::Config> {
        let (port, socket_dir) = read_postmaster_pid(&data_dir.join("pgdata"))?;
        let mut config = tokio_postgres::Config::new();
        config
            .user(SUPERUSER)
            .dbname(database)
            .host_path(socket_dir.unwrap_or_else(|| socket_dir_for(data_dir)))
            .port(port);
        Some(config)
    }

    /// A URL for `database` that `psql` and `tokio_postgres` accept, e.g.
    /// `postgresql://postgres@/hook_events?host=/abs/.hook-data/run&port=5432`. It holds no
    /// password because none exists: only the socket directory's owner can connect.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}@/{}?host={}&port={}",
            percent_encode(database.as_bytes(), false),
            percent_encode(self.socket_dir.as_os_str().as_bytes(), true),
            self.port
        )
    }

    /// The cluster's root directory, absolute.
    pub fn data_dir(&self) -> &Path {
        &self.options.data_dir
    }

    /// Whether this process started the server (and so [`stop`](Self::stop) will stop it).
    pub fn started_here(&self) -> bool {
        self.started_here.load(Ordering::SeqCst)
    }

    /// Stops the server with `pg_ctl stop -m fast` if this process started it; otherwise does
    /// nothing, leaving the server to whoever started it.
    pub async fn stop(self) -> Result<(), StoreError> {
        if self.started_here() {
            self.stop_server().await
        } else {
            Ok(())
        }
    }

    /// Stops the server whatever process started it (tests use this to simulate an outage).
    /// Stopping a server that is not running succeeds.
    pub async fn stop_server(&self) -> Result<(), StoreError> {
        let _lock = lock_data_dir(&self.options.data_dir).await?;
        self.pg_ctl_stop().await
    }

    /// Starts the server again, with the same settings, after [`stop_server`](Self::stop_server).
    /// Afterwards [`started_here`](Self::started_here) is true, unless another process had
    /// already started it again.
    pub async fn start_server(&self) -> Result<(), StoreError> {
        let _lock = lock_data_dir(&self.options.data_dir).await?;
        if self.server_running().await? {
            tracing::info!(
                data_dir = %self.options.data_dir.display(),
                "embedded PostgreSQL already running"
            );
            return Ok(());
        }
        self.launch().await?;
        self.started_here.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn pgdata(&self) -> PathBuf {
        self.options.data_dir.join("pgdata")
    }

    fn log_file(&self) -> PathBuf {
        self.options.data_dir.join("postgres.log")
    }

    fn error(&self, reason: impl Into<String>) -> StoreError {
        cluster_error(&self.options.data_dir, reason)
    }

    async fn initdb(&self) -> Result<(), StoreError> {
        let begun = Instant::now();
        tracing::info!(
            data_dir = %self.options.data_dir.display(),
            "initializing embedded PostgreSQL cluster"
        );
        let pgdata = self.pgdata();
        let mut args = vec![
            OsStr::new("-D"),
            pgdata.as_os_str(),
            OsStr::new("-U"),
            OsStr::new(SUPERUSER),
            OsStr::new("--auth=trust"),
            OsStr::new("-E"),
            OsStr::new("UTF8"),
            OsStr::new("--locale=C"),
        ];
        if !self.options.durable {
            args.push(OsStr::new("--no-sync"));
        }
        let output = self.run("initdb", &args, INITDB_TIMEOUT).await?;
        if !output.status.success() {
            return Err(self.error(format!(
                "initdb failed ({}): {}",
                output.status,
                last_lines(&String::from_utf8_lossy(&output.stderr), LOG_TAIL_LINES)
            )));
        }
        tracing::info!(
            data_dir = %self.options.data_dir.display(),
            elapsed_ms = begun.elapsed().as_millis() as u64,
            "initialized embedded PostgreSQL cluster"
        );
        Ok(())
    }

    /// `pg_ctl status`: exit code 0 means running, 3 not running.
    async fn server_running(&self) -> Result<bool, StoreError> {
        let pgdata = self.pgdata();
        let args = [OsStr::new("status"), OsStr::new("-D"), pgdata.as_os_str()];
        let output = self.run("pg_ctl", &args, Duration::from_secs(30)).await?;
        match output.status.code() {
            Some(0) => Ok(true),
            Some(3) => Ok(false),
            _ => Err(self.error(format!(
                "pg_ctl status failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))),
        }
    }

    /// Connects to a server some other process started the way it says it listens:
    /// `postmaster.pid` names its port and first socket directory, else `socket_dir` remembers it.
    fn adopt_running_server(&mut self) {
        if let Some((port, socket_dir)) = read_postmaster_pid(&self.pgdata()) {
            self.port = port;
            if let Some(socket_dir) = socket_dir {
                self.socket_dir = socket_dir;
                return;
            }
        }
        if let Ok(remembered) = fs::read(self.options.data_dir.join("socket_dir")) {
            let remembered = remembered.trim_ascii_end();
            if !remembered.is_empty() {
                self.socket_dir = PathBuf::from(OsStr::from_bytes(remembered));
            }
        }
    }

    /// Starts the server with `pg_ctl start` and waits until it accepts connections.
    async fn launch(&self) -> Result<(), StoreError> {
        let begun = Instant::now();
        let data_dir = self.options.data_dir.display().to_string();
        tracing::info!(data_dir, "starting embedded PostgreSQL");
        let server_options = self.server_options()?;
        self.ensure_private_dir(&self.socket_dir)?;
        let mut remembered = self.socket_dir.as_os_str().as_bytes().to_vec();
        remembered.push(b'\n');
        let remembered_path = self.options.data_dir.join("socket_dir");
        fs::write(&remembered_path, remembered)
            .map_err(|e| StoreError::io(format!("writing {}", remembered_path.display()), e))?;
        let log_file = self.log_file();
        self.ensure_log_file(&log_file)?;

        let pgdata = self.pgdata();
        let wait_secs = PG_CTL_WAIT_SECS.to_string();
        let args = [
            OsStr::new("-D"),
            pgdata.as_os_str(),
            OsStr::new("-l"),
            log_file.as_os_str(),
            OsStr::new("-w"),
            OsStr::new("-t"),
            OsStr::new(&wait_secs),
            OsStr::new("-o"),
            OsStr::new(&server_options),
            OsStr::new("start"),
        ];
        // pg_ctl detaches the server into its own session, so a Ctrl-C aimed at this process
        // does not reach it: the processor can still drain through the database on shutdown.
        let timeout = Duration::from_secs(PG_CTL_WAIT_SECS + 30);
        let output = self.run("pg_ctl", &args, timeout).await?;
        if !output.status.success() {
            return Err(self.error(format!(
                "pg_ctl start failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                self.log_tail()
            )));
        }
        tracing::info!(
            data_dir,
            socket_dir = %self.socket_dir.display(),
            elapsed_ms = begun.elapsed().as_millis() as u64,
            "started embedded PostgreSQL"
        );
        Ok(())
    }

    /// The `-o` argument of `pg_ctl start`. pg_ctl hands it to `/bin/sh`, hence the quotes;
    /// [`socket_dir_usable`] keeps quotes and commas out of the socket directory.
    fn server_options(&self) -> Result<String, StoreError> {
        let socket_dir =
            self.socket_dir.to_str().filter(|_| socket_dir_usable(&self.socket_dir)).ok_or_else(|| {
                self.error(format!(
                    "socket directory {} is not usable (too long or contains quotes or commas)",
                    self.socket_dir.display()
                ))
            })?;
        let mut options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{socket_dir}' -c port={} \
             -c max_connections={}",
            self.port, self.options.max_connections
        );
        if !self.options.durable {
            options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        Ok(options)
    }

    async fn pg_ctl_stop(&self) -> Result<(), StoreError> {
        if !self.server_running().await? {
            return Ok(());
        }
        let pgdata = self.pgdata();
        let wait_secs = PG_CTL_WAIT_SECS.to_string();
        let args = [
            OsStr::new("-D"),
            pgdata.as_os_str(),
            OsStr::new("-m"),
            OsStr::new("fast"),
            OsStr::new("-w"),
            OsStr::new("-t"),
            OsStr::new(&wait_secs),
            OsStr::new("stop"),
        ];
        let timeout = Duration::from_secs(PG_CTL_WAIT_SECS + 30);
        let output = self.run("pg_ctl", &args, timeout).await?;
        if !output.status.success() {
            return Err(self.error(format!(
                "pg_ctl stop failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                self.log_tail()
            )));
        }
        tracing::info!(data_dir = %self.options.data_dir.display(), "stopped embedded PostgreSQL");
        Ok(())
    }

    /// Runs one of the server programs as the server's account, in the data directory.
    async fn run(&self, program: &str, args: &[&OsStr], timeout: Duration) -> Result<Output, StoreError> {
        let path = self.binaries.program(program);
        let mut command = Command::new(&path);
        command
            .args(args)
            .current_dir(&self.options.data_dir)
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(account) = &self.account {
            command
                .uid(account.uid)
                .gid(account.gid)
                .env("HOME", &account.home)
                .env("USER", SERVER_ACCOUNT)
                .env("LOGNAME", SERVER_ACCOUNT);
        }
        let child = command.spawn().map_err(|e| StoreError::io(format!("running {}", path.display()), e))?;
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(output) => output.map_err(|e| StoreError::io(format!("running {}", path.display()), e)),
            Err(_) => {
                Err(self.error(format!("{program} did not finish within {} seconds", timeout.as_secs())))
            }
        }
    }

    /// Creates `dir` (mode 0700) for the server's account, or checks that the existing one is a
    /// real directory belonging to it (or to us) before making it private again: the fallback
    /// directory is in world-writable `/tmp`, where someone else could have made it first.
    fn ensure_private_dir(&self, dir: &Path) -> Result<(), StoreError> {
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StoreError::io(format!("creating {}", dir.display()), e)),
        }
        let meta = fs::symlink_metadata(dir)
            .map_err(|e| StoreError::io(format!("inspecting {}", dir.display()), e))?;
        if !meta.is_dir() {
            return Err(
                self.error(format!("socket directory {} exists and is not a directory", dir.display()))
            );
        }
        let ours = nix::unistd::geteuid().as_raw();
        let server = self.account.as_ref().map_or(ours, |account| account.uid);
        if meta.uid() != ours && meta.uid() != server {
            return Err(self.error(format!(
                "socket directory {} belongs to another user (uid {})",
                dir.display(),
                meta.uid()
            )));
        }
        if let Some(account) = &self.account {
            chown(dir, account)?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| StoreError::io(format!("making {} private", dir.display()), e))
    }

    /// Creates the server log (mode 0600) for the server's account, so `pg_ctl -l` can append.
    fn ensure_log_file(&self, path: &Path) -> Result<(), StoreError> {
        fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::io(format!("creating {}", path.display()), e))?;
        match &self.account {
            Some(account) => chown(path, account),
            None => Ok(()),
        }
    }

    /// The last lines of the server log, for error messages ("" when there are none).
    fn log_tail(&self) -> String {
        let path = self.log_file();
        match read_tail(&path, 8 * 1024) {
            Ok(text) if !text.trim().is_empty() => {
                format!("; last lines of {}:\n{}", path.display(), last_lines(&text, LOG_TAIL_LINES))
            }
            _ => String::new(),
        }
    }

    async fn connect(&self, database: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = self.config(database).connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "embedded PostgreSQL connection ended");
            }
        });
        Ok(client)
    }

    /// Creates the application's database unless it exists; a racing process creating it too
    /// (`duplicate_database`) is fine. When reusing a server, warns if it runs with settings other
    /// than the ones asked for, since they only change on restart.
    async fn create_database_if_missing(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + CONNECT_PATIENCE;
        let client = loop {
            match self.connect("postgres").await {
                Ok(client) => break client,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => {
                    return Err(self.error(format!(
                        "cannot connect through socket directory {}: {error}{}",
                        self.socket_dir.display(),
                        self.log_tail()
                    )));
                }
            }
        };

        let database = &self.options.database;
        let exists =
            client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[database]).await?.is_some();
        if !exists {
            let sql = format!("CREATE DATABASE {}", quote_identifier(database));
            match client.batch_execute(&sql).await {
                Ok(()) => tracing::info!(database, "created database"),
                Err(error) if error.code() == Some(&SqlState::DUPLICATE_DATABASE) => {}
                Err(error) => return Err(error.into()),
            }
        }

        if !self.started_here() {
            let row = client
                .query_one("SELECT current_setting('max_connections')::int, current_setting('fsync')", &[])
                .await?;
            let max_connections: i32 = row.get(0);
            let fsync: String = row.get(1);
            if i64::from(max_connections) < i64::from(self.options.max_connections) {
                tracing::warn!(
                    max_connections,
                    wanted = self.options.max_connections,
                    "reused embedded PostgreSQL allows fewer connections than asked for; restart it to apply"
                );
            }
            if self.options.durable && fsync == "off" {
                tracing::warn!(
                    "reused embedded PostgreSQL runs with fsync off; restart it to make it durable"
                );
            }
        }
        Ok(())
    }
}

fn cluster_error(dir: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Cluster { dir: dir.to_path_buf(), reason: reason.into() }
}

fn validate(options: &ClusterOptions) -> Result<(), StoreError> {
    if options.database.is_empty() || options.database.contains('\0') {
        return Err(StoreError::Config("the embedded cluster's database name is empty or has a NUL".into()));
    }
    if options.max_connections == 0 {
        return Err(StoreError::Config("the embedded cluster's max_connections must be at least 1".into()));
    }
    Ok(())
}

/// The account the server runs as: `None` (this process's own) unless we are root.
fn server_account(data_dir: &Path) -> Result<Option<Account>, StoreError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name(SERVER_ACCOUNT) {
        Ok(Some(user)) if !user.uid.is_root() => {
            Ok(Some(Account { uid: user.uid.as_raw(), gid: user.gid.as_raw(), home: user.dir }))
        }
        Ok(_) => Err(cluster_error(data_dir, ROOT_WITHOUT_ACCOUNT)),
        Err(errno) => Err(cluster_error(
            data_dir,
            format!("running as root: cannot look up the postgres account: {errno}"),
        )),
    }
}

/// Makes `data_dir` absolute and free of symlinks, creates it, and (as root) checks that the
/// server's account can reach it before handing it over.
fn prepare_data_dir(data_dir: &Path, account: Option<&Account>) -> Result<PathBuf, StoreError> {
    let absolute = std::path::absolute(data_dir)
        .map_err(|e| StoreError::io(format!("resolving {}", data_dir.display()), e))?;
    check_quotable(&absolute)?;
    if let Some(account) = account {
        // Checked before creating anything, so a refused directory is not left behind.
        check_reachable(&absolute, account)?;
    }
    fs::create_dir_all(&absolute)
        .map_err(|e| StoreError::io(format!("creating {}", absolute.display()), e))?;
    let canonical = fs::canonicalize(&absolute)
        .map_err(|e| StoreError::io(format!("resolving {}", absolute.display()), e))?;
    check_quotable(&canonical)?;
    if let Some(account) = account {
        // Again through the real path, in case a symlink led somewhere else.
        check_reachable(&canonical, account)?;
        chown(&canonical, account)?;
    }
    Ok(canonical)
}

/// pg_ctl puts the data directory and log file between double quotes in a `/bin/sh` command.
fn check_quotable(dir: &Path) -> Result<(), StoreError> {
    let bytes = dir.as_os_str().as_bytes();
    if bytes.iter().any(|b| matches!(b, b'"' | b'$' | b'`' | b'\\') || b.is_ascii_control()) {
        return Err(cluster_error(
            dir,
            "the data directory's path contains a character pg_ctl cannot quote (\", $, `, \\ or a control character)",
        ));
    }
    Ok(())
}

fn check_reachable(dir: &Path, account: &Account) -> Result<(), StoreError> {
    match first_unsearchable_ancestor(dir, account.uid, account.gid) {
        Some(blocked) => Err(unreachable_error(dir, &blocked, account.uid)),
        None => Ok(()),
    }
}

fn unreachable_error(dir: &Path, blocked: &Path, uid: u32) -> StoreError {
    cluster_error(
        dir,
        format!(
            "the postgres account (uid {uid}) cannot reach it because it may not enter {}; \
             pick a --data-dir the postgres account can reach (e.g. under /tmp or /var/lib)",
            blocked.display()
        ),
    )
}

/// The outermost existing ancestor of `dir` (not `dir` itself, which we hand over to the account)
/// that `uid`/`gid` may not search, judged by mode bits. ACLs are not consulted; supplementary
/// groups need not be, since the server's processes run without them.
fn first_unsearchable_ancestor(dir: &Path, uid: u32, gid: u32) -> Option<PathBuf> {
    if uid == 0 {
        return None;
    }
    let mut ancestors: Vec<&Path> = dir.ancestors().skip(1).collect();
    ancestors.reverse();
    ancestors.into_iter().find_map(|ancestor| {
        let meta = fs::metadata(ancestor).ok()?;
        let bit = if meta.uid() == uid {
            0o100
        } else if meta.gid() == gid {
            0o010
        } else {
            0o001
        };
        (meta.mode() & bit == 0).then(|| ancestor.to_path_buf())
    })
}

fn chown(path: &Path, account: &Account) -> Result<(), StoreError> {
    std::os::unix::fs::chown(path, Some(account.uid), Some(account.gid))
        .map_err(|e| StoreError::io(format!("giving {} to the postgres account", path.display()), e))
}

/// Takes the exclusive lock on `data_dir/.lock`, waiting for other processes (in a blocking
/// thread). The lock is released when the returned file is dropped, or when the process dies.
// `File::lock` is stable since Rust 1.89; the workspace's rust-version says 1.85.
#[allow(clippy::incompatible_msrv)]
async fn lock_data_dir(data_dir: &Path) -> Result<fs::File, StoreError> {
    let path = data_dir.join(".lock");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(fs::TryLockError::WouldBlock) => {
            tracing::info!(
                data_dir = %data_dir.display(),
                "waiting for another process to start embedded PostgreSQL"
            );
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(StoreError::io(format!("locking {}", path.display()), e));
        }
    }
    let locked = tokio::task::spawn_blocking(move || file.lock().map(|()| file)).await;
    match locked {
        Ok(Ok(file)) => Ok(file),
        Ok(Err(e)) => Err(StoreError::io(format!("locking {}", path.display()), e)),
        Err(e) => Err(cluster_error(data_dir, format!("waiting for {}: {e}", path.display()))),
    }
}

/// `run/` under the data directory, or `/tmp/hook-events-<hash>` when the socket path would be
/// too long (or unquotable) there.
fn socket_dir_for(data_dir: &Path) -> PathBuf {
    let run = data_dir.join("run");
    if socket_dir_usable(&run) {
        run
    } else {
        PathBuf::from(format!("/tmp/hook-events-{:016x}", fnv1a(data_dir.as_os_str().as_bytes())))
    }
}

/// Whether `dir` can hold the socket: the socket path fits, and the directory can be written in
/// `unix_socket_directories='...'` (a comma-separated list inside a shell-quoted word).
fn socket_dir_usable(dir: &Path) -> bool {
    let Some(text) = dir.to_str() else {
        return false;
    };
    let socket_len = dir.join(format!(".s.PGSQL.{PORT}")).as_os_str().len();
    socket_len <= MAX_SOCKET_PATH
        && !text.chars().any(|c| matches!(c, '\'' | '"' | ',' | '\\') || c.is_control())
}

/// 64-bit FNV-1a: a hash that, unlike `DefaultHasher`, is the same in every Rust release.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The port and first socket directory from `postmaster.pid` (lines 4 and 5).
fn read_postmaster_pid(pgdata: &Path) -> Option<(u16, Option<PathBuf>)> {
    let text = fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let mut lines = text.lines().skip(3);
    let port = lines.next()?.trim().parse().ok()?;
    let socket_dir = lines.next().map(str::trim).filter(|s| !s.is_empty()).map(PathBuf::from);
    Some((port, socket_dir))
}

fn read_tail(path: &Path, max_bytes: u64) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|line| !line.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Percent-encodes everything but unreserved URL characters (and `/` when `keep_slash`).
fn percent_encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &byte in bytes {
        if byte.is_ascii_alphanumeric()
            || matches!(byte, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && byte == b'/')
        {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A fresh directory under /tmp, unique per process and test; on drop it stops any server a
    /// failed test left running in it and removes it (and a fallback socket directory).
    struct Scratch {
        dir: PathBuf,
    }

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::SeqCst);
            let dir = PathBuf::from(format!("/tmp/hook-store-cluster-{}-{n}-{tag}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("creating a scratch directory under /tmp");
            Scratch { dir }
        }

        fn options(&self, data_dir: PathBuf) -> ClusterOptions {
            ClusterOptions {
                data_dir,
                database: "hook_events_test".into(),
                durable: false,
                max_connections: 20,
            }
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            for entry in walk(&self.dir) {
                if entry.ends_with("pgdata") && entry.join("postmaster.pid").exists() {
                    stop_immediately(&entry);
                }
                if let Ok(socket_dir) = fs::read_to_string(entry.join("socket_dir")) {
                    let socket_dir = socket_dir.trim_end();
                    if socket_dir.starts_with("/tmp/hook-events-") {
                        let _ = fs::remove_dir_all(socket_dir);
                    }
                }
            }
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut found = vec![dir.to_path_buf()];
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) && entry.file_name() != "pgdata" {
                    found.extend(walk(&entry.path()));
                } else if entry.file_name() == "pgdata" {
                    found.push(entry.path());
                }
            }
        }
        found
    }

    fn stop_immediately(pgdata: &Path) {
        let Ok(binaries) = PgBinaries::find() else {
            return;
        };
        let mut command = std::process::Command::new(binaries.program("pg_ctl"));
        command.arg("-D").arg(pgdata).args(["-m", "immediate", "-w", "stop"]);
        if let Ok(Some(account)) = server_account(pgdata) {
            command.uid(account.uid).gid(account.gid).current_dir("/");
        }
        let _ = command.output();
    }

    async fn select_one(cluster: &EmbeddedCluster, database: &str) -> Result<i32, StoreError> {
        let client = cluster.connect(database).await?;
        Ok(client.query_one("SELECT 1", &[]).await?.get(0))
    }

    #[tokio::test]
    async fn concurrent_starts_share_one_server_that_survives_a_restart() -> Result<(), StoreError> {
        let scratch = Scratch::new("shared");
        let options = scratch.options(scratch.dir.join("data"));
        let (a, b, c) = tokio::join!(
            EmbeddedCluster::start(options.clone()),
            EmbeddedCluster::start(options.clone()),
            EmbeddedCluster::start(options.clone()),
        );
        let mut clusters = vec![a?, b?, c?];
        assert_eq!(clusters.iter().filter(|c| c.started_here()).count(), 1);
        for cluster in &clusters {
            assert_eq!(select_one(cluster, "hook_events_test").await?, 1);
            assert_eq!(cluster.data_dir(), scratch.dir.join("data"));
        }
        let owner_index = clusters.iter().position(|c| c.started_here()).unwrap_or(0);
        let owner = clusters.remove(owner_index);
        let reuser = clusters.remove(0);

        // The URL works as-is, and reaches the socket in the private run/ directory.
        let config: tokio_postgres::Config = owner.url("hook_events_test").parse()?;
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(connection);
        client.batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)").await?;
        assert!(owner.url("hook_events_test").ends_with("/data/run&port=5432"));
        let run = fs::metadata(scratch.dir.join("data/run")).map_err(|e| StoreError::io("run dir", e))?;
        assert_eq!(run.mode() & 0o777, 0o700);

        // A process that reused the server leaves it running when it stops.
        for other in clusters {
            other.stop().await?;
        }
        assert_eq!(select_one(&owner, "hook_events_test").await?, 1);

        // An outage and recovery, driven from a process that did not start the server.
        reuser.stop_server().await?;
        assert!(reuser.connect("hook_events_test").await.is_err());
        reuser.stop_server().await?; // stopping a stopped server is fine
        reuser.start_server().await?;
        assert!(reuser.started_here());
        let client = owner.connect("hook_events_test").await?;
        let kept: i32 = client.query_one("SELECT v FROM kept", &[]).await?.get(0);
        assert_eq!(kept, 7);

        // A later start reuses it; then both that started it stop it (the second finds it stopped).
        let again = EmbeddedCluster::start(options).await?;
        assert!(!again.started_here());
        again.stop().await?;
        owner.stop().await?;
        assert!(reuser.connect("hook_events_test").await.is_err());
        reuser.stop().await?;
        Ok(())
    }

    #[tokio::test]
    async fn a_deep_data_dir_puts_its_socket_in_a_private_tmp_dir() -> Result<(), StoreError> {
        let scratch = Scratch::new("deep");
        let data_dir =
            scratch.dir.join("a-directory-name-long-enough-to-push-the-socket-path").join("past-the-limit");
        let cluster = EmbeddedCluster::start(scratch.options(data_dir.clone())).await?;
        assert!(cluster.started_here());
        let expected = socket_dir_for(&data_dir);
        assert!(expected.starts_with("/tmp"), "{}", expected.display());
        let remembered =
            fs::read_to_string(data_dir.join("socket_dir")).map_err(|e| StoreError::io("socket_dir", e))?;
        assert_eq!(remembered.trim_end(), expected.to_string_lossy());
        let meta = fs::symlink_metadata(&expected).map_err(|e| StoreError::io("socket dir", e))?;
        assert_eq!(meta.mode() & 0o777, 0o700);
        assert_eq!(select_one(&cluster, "hook_events_test").await?, 1);

        let reused = EmbeddedCluster::start(scratch.options(data_dir)).await?;
        assert!(!reused.started_here());
        assert_eq!(reused.url("postgres"), cluster.url("postgres"));
        reused.stop().await?;
        cluster.stop().await?;
        Ok(())
    }

    #[tokio::test]
    async fn as_root_a_data_dir_the_postgres_account_cannot_reach_is_refused() -> Result<(), StoreError> {
        if !nix::unistd::geteuid().is_root() || server_account(Path::new("/")).is_err() {
            return Ok(()); // only root hands the server to another account
        }
        let scratch = Scratch::new("private");
        let private = scratch.dir.join("like-root-home");
        fs::DirBuilder::new().mode(0o700).create(&private).map_err(|e| StoreError::io("mkdir", e))?;
        let data_dir = private.join("data");
        let error = EmbeddedCluster::start(scratch.options(data_dir.clone())).await.err();
        let message = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("cannot reach"), "{message}");
        assert!(message.contains(&format!("may not enter {}", private.display())), "{message}");
        assert!(message.contains("pick a --data-dir the postgres account can reach"), "{message}");
        assert!(!data_dir.exists(), "a refused data dir is not created");
        Ok(())
    }

    #[test]
    fn unsearchable_ancestors_are_found_by_mode_bits() {
        let scratch = Scratch::new("modes");
        let locked = scratch.dir.join("locked");
        fs::DirBuilder::new().mode(0o700).create(&locked).expect("mkdir");
        let data_dir = locked.join("inner/data");
        let owner = nix::unistd::geteuid().as_raw();
        let stranger = owner.wrapping_add(4242).max(1);
        let group = nix::unistd::getegid().as_raw().wrapping_add(4242);

        assert_eq!(first_unsearchable_ancestor(&data_dir, stranger, group), Some(locked.clone()));
        assert_eq!(first_unsearchable_ancestor(&data_dir, 0, 0), None);
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o711)).expect("chmod");
        assert_eq!(first_unsearchable_ancestor(&data_dir, stranger, group), None);

        let message = unreachable_error(&data_dir, &locked, stranger).to_string();
        assert!(message.starts_with(&format!("embedded cluster at {}:", data_dir.display())));
        assert!(message.contains("(e.g. under /tmp or /var/lib)"), "{message}");
    }

    #[test]
    fn the_socket_goes_to_tmp_only_when_run_would_not_do() {
        let short = Path::new("/srv/hook/.hook-data");
        assert_eq!(socket_dir_for(short), short.join("run"));
        let long = PathBuf::from(format!("/srv/{}", "x".repeat(90)));
        let fallback = socket_dir_for(&long);
        assert_eq!(fallback, socket_dir_for(&long), "the choice is stable");
        assert_ne!(fallback, socket_dir_for(&long.join("other")));
        let name = fallback.to_string_lossy().into_owned();
        assert!(name.starts_with("/tmp/hook-events-") && name.len() == "/tmp/hook-events-".len() + 16);
        assert!(socket_dir_for(Path::new("/srv/it's")).starts_with("/tmp"));
        assert!(socket_dir_for(Path::new("/srv/a,b")).starts_with("/tmp"));
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn urls_encode_what_needs_encoding() {
        assert_eq!(percent_encode(b"/abs/.hook-data/run", true), "/abs/.hook-data/run");
        assert_eq!(percent_encode(b"/a b/r&n", true), "/a%20b/r%26n");
        assert_eq!(percent_encode(b"db/x?", false), "db%2Fx%3F");
        assert_eq!(quote_identifier("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(last_lines("a\nb\n\nc\nd\ne\nf\n", 3), "d\ne\nf");
    }

    #[test]
    fn server_binaries_are_found_with_all_three_programs() {
        let binaries = PgBinaries::find().expect("PostgreSQL server binaries on this machine");
        assert!(has_server_programs(&binaries.bindir), "{}", binaries.bindir.display());
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("lib"), None);
    }

    #[tokio::test]
    async fn bad_options_are_refused_before_touching_the_disk() {
        let scratch = Scratch::new("bad");
        let data_dir = scratch.dir.join("data");
        let mut options = scratch.options(data_dir.clone());
        options.database.clear();
        assert!(matches!(EmbeddedCluster::start(options.clone()).await, Err(StoreError::Config(_))));
        options.database = "ok".into();
        options.max_connections = 0;
        assert!(matches!(EmbeddedCluster::start(options).await, Err(StoreError::Config(_))));
        assert!(!data_dir.exists());
    }
}
