//! The ingest socket's server, run inside `hook-processor` (`HOOK_INGEST_SOCKET`): accepts
//! requests of `hook-ingest` on a local Unix socket ([`crate::wire`]), gathers the requests that
//! arrive together into one multi-row insert on a connection it keeps open, and answers each
//! client `stored` only after that insert committed.
//!
//! A hook then costs its process start, one local round trip and its share of one commit, instead
//! of a new database backend per call. Inserts skip ids already stored, so a client that got no
//! answer and stores the same event again through the database or its spool does not double it.
//!
//! A bad client cannot hurt the processor: a request is at most [`MAX_REQUEST`] bytes and must
//! arrive within [`ServerConfig::request_timeout`]; connections, memory held by requests and
//! requests waiting for the database are each bounded, and past a bound a client is answered
//! `error busy...` at once (it then stores its event itself). A request the database refuses for
//! its data (a value too long, a `\u0000`) is stored as a raw record, as `hook-ingest` itself does,
//! and never fails the requests it was gathered with.
//!
//! [`Listener::bind`] publishes the socket atomically with its permissions (bound under a
//! temporary name, `chmod`ed, then renamed over the path), and holds an exclusive lock on
//! `<path>.lock` while it serves, so two processors never serve one path and a socket left by a
//! killed processor is replaced.

use std::fs::{self, File, OpenOptions, Permissions, TryLockError};
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hook_core::NewEvent;
use hook_store::deadpool_postgres::Pool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::deliver::{chain, Writer};
use crate::wire::{decode_request, request_end, Answer, MAX_REQUEST};

/// Requests answered, by answer (`stored` or `error`).
pub const REQUESTS_METRIC: &str = "hook_events_ingest_requests_total";

/// Events committed through the socket.
pub const EVENTS_METRIC: &str = "hook_events_ingest_events_total";

/// How much is read from a client at a time, at most.
const READ_CHUNK: usize = 64 * 1024;

/// How long connections still open at shutdown may take to be answered.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The server's limits. [`Default`] is what `hook-processor` uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Connections handled at once; more are answered `error busy` and closed. Default 256.
    pub max_connections: usize,
    /// Bytes of requests held at once (read, or waiting for their insert), at least
    /// [`MAX_REQUEST`]; past it a request is answered `error busy`. Default 40 MiB.
    pub max_memory: usize,
    /// How long a client may take to send its whole request. Default 2 s.
    pub request_timeout: Duration,
    /// Requests read and waiting for the database, at most; more are answered `error busy`.
    /// Default 1024.
    pub max_waiting: usize,
    /// One insert gathers requests until it holds this many events (or [`Self::batch_bytes`]).
    /// Default 1000.
    pub batch_events: usize,
    /// One insert gathers requests until they hold this many bytes. Default 8 MiB.
    pub batch_bytes: usize,
    /// How long one insert may take (getting a connection included) before its requests are
    /// answered `error`. Default 10 s.
    pub store_timeout: Duration,
    /// `synchronous_commit` of the inserts (set with `SET LOCAL` in each insert's transaction);
    /// `None` keeps the server's setting. Default `None`.
    pub synchronous_commit: Option<&'static str>,
    /// A pause between a commit and its answers: zero, except in the tests that kill a processor
    /// in between (`hook-processor` sets it only in debug builds, from
    /// `HOOK_INGEST_TEST_ANSWER_DELAY`).
    pub answer_delay: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 256,
            max_memory: 40 * 1024 * 1024,
            request_timeout: Duration::from_secs(2),
            max_waiting: 1024,
            batch_events: 1000,
            batch_bytes: 8 * 1024 * 1024,
            store_timeout: Duration::from_secs(10),
            synchronous_commit: None,
            answer_delay: Duration::ZERO,
        }
    }
}

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process holds the socket's lock: it serves this path.
    #[error("another hook-processor serves the ingest socket {0} (its lock {0}.lock is held)")]
    InUse(PathBuf),
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ServerError {
    let path = path.to_path_buf();
    move |source| ServerError::Io { what, path, source }
}

/// A bound ingest socket. Dropping it removes the socket file (if it is still this one), so new
/// hooks go straight to the database.
#[derive(Debug)]
pub struct Listener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    inode: u64,
    /// Held (flock) while the listener lives.
    _lock: File,
}

impl Listener {
    /// Binds the socket at `path` with permissions `mode` (e.g. `0o600`; `0o660` to let the
    /// processor's group in). Creates the directory if missing, private except for the search
    /// permission `mode` implies; an existing directory is left as it is. Replaces a socket left
    /// by a processor that is gone. Call inside a tokio runtime.
    ///
    /// # Errors
    /// [`ServerError::InUse`] when another processor serves `path`; [`ServerError::Io`] when the
    /// directory, the lock or the socket cannot be made.
    // `File::try_lock` is stable since Rust 1.89, the workspace's rust-version.
    #[allow(clippy::incompatible_msrv)]
    pub fn bind(path: &Path, mode: u32) -> Result<Listener, ServerError> {
        let name = path.file_name().ok_or_else(|| ServerError::Io {
            what: "the socket path names no file:",
            path: path.to_path_buf(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(directory_mode(mode))
                .create(dir)
                .map_err(io_error("creating the directory", dir))?;
        }
        let mut lock_name = name.to_os_string();
        lock_name.push(".lock");
        let lock_path = dir.join(lock_name);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_error("opening the lock", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(ServerError::InUse(path.to_path_buf())),
            Err(TryLockError::Error(source)) => return Err(io_error("locking", &lock_path)(source)),
        }
        // Bound under a temporary name and renamed into place with its permissions set, so that
        // no client ever sees the socket with other permissions, and a stale one is replaced.
        let temporary = dir.join(format!(".{}.sock", std::process::id()));
        let _ = fs::remove_file(&temporary);
        let bound = std::os::unix::net::UnixListener::bind(&temporary)
            .map_err(io_error("binding the socket", &temporary))?;
        let published = fs::set_permissions(&temporary, Permissions::from_mode(mode))
            .map_err(io_error("setting the permissions of", &temporary))
            .and_then(|()| fs::rename(&temporary, path).map_err(io_error("moving the socket to", path)));
        if let Err(error) = published {
            let _ = fs::remove_file(&temporary);
            return Err(error);
        }
        let inode = fs::symlink_metadata(path).map_err(io_error("reading", path))?.ino();
        bound.set_nonblocking(true).map_err(io_error("setting up", path))?;
        let listener = tokio::net::UnixListener::from_std(bound).map_err(io_error("setting up", path))?;
        Ok(Listener { listener, path: path.to_path_buf(), inode, _lock: lock })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|meta| meta.ino() == self.inode) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The directory's permissions for a socket of `mode`: the owner's, plus search (but not
/// listing) for whoever `mode` lets connect.
fn directory_mode(mode: u32) -> u32 {
    let group = if mode & 0o070 != 0 { 0o010 } else { 0 };
    let others = if mode & 0o007 != 0 { 0o001 } else { 0 };
    0o700 | group | others
}

/// A request read, waiting for its insert.
struct Job {
    events: Vec<NewEvent>,
    /// Bytes the request took.
    bytes: usize,
    reply: oneshot::Sender<Result<(), String>>,
    /// Its share of [`ServerConfig::max_memory`], given back when the job is answered.
    _memory: Vec<OwnedSemaphorePermit>,
}

/// Serves `listener` until `shutdown` completes, inserting through `pool`. Then removes the
/// socket, answers the connections already open (for at most 2 s) and returns once every
/// request read has been inserted or answered `error`.
pub async fn serve(listener: Listener, pool: Pool, config: ServerConfig, shutdown: impl Future<Output = ()>) {
    let config = Arc::new(config);
    let (jobs, queue) = mpsc::channel::<Job>(config.max_waiting.max(1));
    let writer = tokio::spawn(write_loop(queue, pool, Arc::clone(&config)));
    let connections = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let memory = Arc::new(Semaphore::new(config.max_memory.max(MAX_REQUEST + READ_CHUNK)));
    let mut tasks = JoinSet::new();
    let mut accept_failing = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    accept_failing = false;
                    match Arc::clone(&connections).try_acquire_owned() {
                        Ok(permit) => {
                            let (memory, jobs, config) = (Arc::clone(&memory), jobs.clone(), Arc::clone(&config));
                            tasks.spawn(handle(stream, permit, memory, jobs, config));
                        }
                        Err(_) => {
                            metrics::counter!(REQUESTS_METRIC, "answer" => "error").increment(1);
                            // Never blocks: a short line into an empty socket buffer.
                            let busy = Answer::Error("busy: too many connections".into());
                            let _ = stream.try_write(busy.to_line().as_bytes());
                        }
                    }
                }
                Err(error) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    if !accept_failing {
                        warn!(%error, socket = %listener.path.display(), "accepting on the ingest socket failed");
                        accept_failing = true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    info!(socket = %listener.path.display(), "closing the ingest socket");
    drop(listener);
    drop(jobs);
    let finished =
        tokio::time::timeout(SHUTDOWN_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tasks.shutdown().await;
    }
    let _ = writer.await;
}

/// One connection: read the request, have it inserted, answer.
async fn handle(
    mut stream: UnixStream,
    _permit: OwnedSemaphorePermit,
    memory: Arc<Semaphore>,
    jobs: mpsc::Sender<Job>,
    config: Arc<ServerConfig>,
) {
    let read = tokio::time::timeout(config.request_timeout, read_request(&mut stream, &memory)).await;
    let answer = match read {
        Err(_) => {
            Answer::Error(format!("no complete request within {}ms", config.request_timeout.as_millis()))
        }
        Ok(Err(why)) => Answer::Error(why),
        Ok(Ok((events, bytes, held))) => submit(events, bytes, held, &jobs).await,
    };
    let label = if matches!(answer, Answer::Stored(_)) { "stored" } else { "error" };
    metrics::counter!(REQUESTS_METRIC, "answer" => label).increment(1);
    if let Answer::Error(why) = &answer {
        debug!(why, "ingest request not stored");
    }
    if !config.answer_delay.is_zero() {
        tokio::time::sleep(config.answer_delay).await;
    }
    // The client may be gone (it gave up): nothing to do about it, its id makes its retry harmless.
    let _ = tokio::time::timeout(config.request_timeout, stream.write_all(answer.to_line().as_bytes())).await;
}

/// Reads one request, holding memory for it as it grows; the events, the request's size and the
/// memory held.
async fn read_request(
    stream: &mut UnixStream,
    memory: &Arc<Semaphore>,
) -> Result<(Vec<NewEvent>, usize, Vec<OwnedSemaphorePermit>), String> {
    let mut buffer = Vec::new();
    let mut held = Vec::new();
    // Bytes of `memory` held: the buffer and the room of the next read, so a client that sends
    // a byte at a time holds no more than one that sends it all at once.
    let mut reserved = 0;
    let mut searched = 0;
    loop {
        if buffer.len() >= MAX_REQUEST {
            return Err(format!("request over {MAX_REQUEST} bytes"));
        }
        let room = (MAX_REQUEST - buffer.len()).min(READ_CHUNK);
        let wanted = (buffer.len() + room).saturating_sub(reserved);
        if wanted > 0 {
            let permits = u32::try_from(wanted).unwrap_or(u32::MAX);
            let permit = Arc::clone(memory)
                .try_acquire_many_owned(permits)
                .map_err(|_| "busy: too many requests in memory".to_owned())?;
            held.push(permit);
            reserved += wanted;
        }
        let start = buffer.len();
        buffer.resize(start + room, 0);
        let read = stream.read(&mut buffer[start..]).await;
        let n = read.map_err(|e| format!("reading the request: {e}"))?;
        buffer.truncate(start + n);
        if n == 0 {
            return Err("the connection was closed before the request ended".into());
        }
        if let Some(end) = request_end(&buffer, searched) {
            if end != buffer.len() {
                return Err("bytes after the request's empty line (one request per connection)".into());
            }
            let events = decode_request(&buffer)?;
            return Ok((events, buffer.len(), held));
        }
        searched = buffer.len();
    }
}

/// Hands the events to the writer and waits for their commit.
async fn submit(
    events: Vec<NewEvent>,
    bytes: usize,
    held: Vec<OwnedSemaphorePermit>,
    jobs: &mpsc::Sender<Job>,
) -> Answer {
    let count = events.len();
    if count == 0 {
        return Answer::Stored(0);
    }
    let (reply, answer) = oneshot::channel();
    match jobs.try_send(Job { events, bytes, reply, _memory: held }) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            return Answer::Error("busy: too many requests waiting for the database".into())
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return Answer::Error("the processor is stopping".into())
        }
    }
    match answer.await {
        Ok(Ok(())) => Answer::Stored(count),
        Ok(Err(why)) => Answer::Error(why),
        Err(_) => Answer::Error("the processor is stopping".into()),
    }
}

/// Takes the waiting requests, as many as one insert may hold, inserts them, answers them; until
/// every sender is gone and the queue is empty.
async fn write_loop(mut queue: mpsc::Receiver<Job>, pool: Pool, config: Arc<ServerConfig>) {
    let mut failing = false;
    while let Some(first) = queue.recv().await {
        let (mut events, mut bytes) = (first.events.len(), first.bytes);
        let mut batch = vec![first];
        while events < config.batch_events && bytes < config.batch_bytes {
            let Ok(job) = queue.try_recv() else { break };
            events += job.events.len();
            bytes += job.bytes;
            batch.push(job);
        }
        let all: Vec<NewEvent> = batch.iter_mut().flat_map(|job| std::mem::take(&mut job.events)).collect();
        let result = store(&pool, &all, &config).await;
        match &result {
            Ok(()) => {
                metrics::counter!(EVENTS_METRIC).increment(all.len() as u64);
                if failing {
                    info!("ingest inserts succeed again");
                    failing = false;
                }
            }
            Err(error) if !failing => {
                warn!(%error, requests = batch.len(), "ingest insert failed; the hooks store their events themselves");
                failing = true;
            }
            Err(error) => debug!(%error, requests = batch.len(), "ingest insert failed"),
        }
        for job in batch {
            let _ = job.reply.send(result.clone());
        }
    }
}

/// Inserts `events` in one statement (one by one, with raw records for what the database refuses,
/// if it refuses the statement for its data), within `timeout`.
async fn store(pool: &Pool, events: &[NewEvent], config: &ServerConfig) -> Result<(), String> {
    let timeout = config.store_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let late = || format!("the database did not answer within {}ms", timeout.as_millis());
    let client = tokio::time::timeout_at(deadline, pool.get())
        .await
        .map_err(|_| late())?
        .map_err(|e| format!("no database connection: {}", chain(&e)))?;
    let writer = Writer { client: &client, synchronous_commit: config.synchronous_commit };
    match tokio::time::timeout_at(deadline, writer.store(events)).await {
        Ok(result) => result.map_err(|e| chain(&e)),
        Err(_) => {
            // A connection that hangs (a network partition), or one left inside the transaction
            // of a `SET LOCAL synchronous_commit`, is not given back to the pool.
            drop(hook_store::deadpool_postgres::Object::take(client));
            Err(late())
        }
    }
}

/// Describes the server's metrics to the installed recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(REQUESTS_METRIC, "ingest socket requests answered, by answer (stored, error)");
    metrics::describe_counter!(EVENTS_METRIC, "events committed through the ingest socket");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_lets_in_whom_the_socket_does() {
        assert_eq!(directory_mode(0o600), 0o700);
        assert_eq!(directory_mode(0o660), 0o710);
        assert_eq!(directory_mode(0o666), 0o711);
    }
}
