//! The spool: events that could not be inserted, kept until a later run can.
//!
//! One file, one JSON line per event (a [`NewEvent`], its id already assigned), appended and
//! `fsync`ed before the hook exits, plus *batch files* beside it (`<spool>.batch-<time>-<pid>-<n>`)
//! holding lines on their way to the database.
//!
//! # Why nothing appended is ever lost
//!
//! The lock and the flush are designed together, so that no timing loses a line:
//!
//! - **Appends** take an exclusive `flock` on the spool file, write one line and `fsync`. That is
//!   the only thing ever done to the spool file under its lock, besides the rename below, so the
//!   lock is held for milliseconds. A writer waits for it at most [`APPEND_PATIENCE`]; should the
//!   holder be frozen (stopped, its machine suspended) that long, the line goes to a batch file of
//!   its own instead (written under a temporary name, `fsync`ed, then renamed), never to a file
//!   someone else may be reading.
//! - **A flush claims** the spool by renaming it, under its lock, to a fresh batch name. It keeps
//!   the lock of the renamed file for as long as it works on it, and releases the spool's name at
//!   once: the next append creates a new spool file. A writer that was waiting for the lock of
//!   the renamed file notices that the spool's path names another file now and moves to it, so it
//!   never waits for a flush, and never appends to a claimed file.
//! - **A batch is private to whoever holds its lock.** Its lines are read and inserted without any
//!   other lock held; then the batch is deleted, or, when time ran out part way, replaced by a
//!   copy of the lines not yet inserted (written to a temporary file and renamed over it). Nobody
//!   appends to a batch, so there is no read-then-truncate window for a line to fall into.
//! - **Nothing is left behind.** A batch whose lock is free (its flusher gave up or died; or a
//!   writer's own batch) is picked up by the next flush, older batches before the spool. When a
//!   batch fails again, the spool is not claimed on top of it, so a lasting failure (a missing
//!   table) leaves one batch, not one per run.
//!
//! Inserts skip ids already in the table, so a line inserted twice (a statement cut off by the
//! deadline that committed anyway, a batch re-read after a crash) is stored once.
//!
//! A line that cannot be read back (a write torn by a crash) becomes a raw record,
//! `hook-ingest/malformed_spool_line` with `payload = {"raw": <the line>}`, whose id is derived
//! from the line's bytes, so reading it twice still stores it once.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::future::Future;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hook_core::NewEvent;
use serde_json::json;
use uuid::{Builder, Uuid};

use crate::mapping::{sanitized, INGEST_SOURCE};

/// How long a writer waits for the spool's lock before it writes its line to a batch file of its
/// own. Holders keep the lock for one append or one rename, so only a frozen holder makes a
/// writer wait this long.
pub const APPEND_PATIENCE: Duration = Duration::from_secs(2);

/// How often a waiting writer tries the lock again (and checks that the spool's path still names
/// the file it waits for).
const LOCK_RETRY: Duration = Duration::from_millis(1);

/// A temporary file older than this was left by a process that died before renaming it; its
/// lines are picked up as a batch.
const ABANDONED: Duration = Duration::from_secs(600);

/// Makes the names of batch and temporary files unique within a process.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// A spool file, by path.
#[derive(Debug, Clone)]
pub struct Spool {
    path: PathBuf,
    patience: Duration,
}

/// One line read from the spool.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The event of the line (a raw record when the line was unreadable).
    pub event: NewEvent,
    /// The line, as written.
    pub line: String,
    /// The file offset just past the line.
    pub end: u64,
}

/// Where [`Spool::append`] put the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// At the end of the spool file, under its lock.
    Spool,
    /// In a batch file of its own, because the lock's holder kept it past the patience.
    OwnBatch,
}

/// What [`Spool::flush`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Events handed to the insert function and accepted.
    pub events: usize,
    /// Why the flush stopped early, if it did; what was not inserted is still spooled.
    pub failure: Option<String>,
}

impl Spool {
    /// The spool at `path` (nothing is created until something is appended).
    pub fn new(path: impl Into<PathBuf>) -> Spool {
        Spool { path: path.into(), patience: APPEND_PATIENCE }
    }

    /// The same spool with another wait for the lock than [`APPEND_PATIENCE`] (for tests).
    pub fn with_append_patience(mut self, patience: Duration) -> Spool {
        self.patience = patience;
        self
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the spool holds nothing: the spool file is missing or empty, and no batch file is
    /// beside it. One `stat` and one directory listing, no lock.
    pub fn is_empty(&self) -> bool {
        let file_empty = fs::metadata(&self.path).map_or(true, |meta| meta.len() == 0);
        file_empty && self.side_files().map_or(true, |files| files.iter().all(|f| !f.pending()))
    }

    /// Appends `event` as one line and `fsync`s it: to the spool file under its lock, or, when
    /// the lock's holder keeps it longer than the patience, to a batch file of its own.
    pub fn append(&self, event: &NewEvent) -> io::Result<Appended> {
        match self.lock(self.patience)? {
            Some(mut locked) => locked.append(event).map(|()| Appended::Spool),
            None => {
                let mut line = Vec::with_capacity(512);
                serde_json::to_writer(&mut line, event).map_err(io::Error::other)?;
                line.push(b'\n');
                self.write_batch(&line).map(|_| Appended::OwnBatch)
            }
        }
    }

    /// Takes the spool file's lock, waiting up to `patience`; `None` when another process holds
    /// it that long. Creates the file (and its directory, private to the user) if missing.
    pub fn lock(&self, patience: Duration) -> io::Result<Option<Locked>> {
        self.lock_file(patience, true)
    }

    // `File::try_lock` is stable since Rust 1.89; the workspace's rust-version says 1.85.
    #[allow(clippy::incompatible_msrv)]
    fn lock_file(&self, patience: Duration, create: bool) -> io::Result<Option<Locked>> {
        let give_up = Instant::now() + patience;
        'open: loop {
            let file = if create {
                self.open()?
            } else {
                match OpenOptions::new().read(true).append(true).open(&self.path) {
                    Ok(file) => file,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(error) => return Err(error),
                }
            };
            let inode = file.metadata()?.ino();
            loop {
                match file.try_lock() {
                    // A flush may have renamed the file before we got its lock: we want the one
                    // the path names.
                    Ok(()) if self.path_inode()? == Some(inode) => {
                        return Ok(Some(Locked { file }));
                    }
                    Ok(()) => continue 'open,
                    Err(TryLockError::WouldBlock) => {
                        if Instant::now() >= give_up {
                            return Ok(None);
                        }
                        // Renamed by a flush that holds it: never wait for a flush.
                        if self.path_inode()? != Some(inode) {
                            if !create && self.path_inode()?.is_none() {
                                return Ok(None);
                            }
                            continue 'open;
                        }
                        std::thread::sleep(LOCK_RETRY);
                    }
                    Err(TryLockError::Error(error)) => return Err(error),
                }
            }
        }
    }

    fn path_inode(&self) -> io::Result<Option<u64>> {
        match fs::metadata(&self.path) {
            Ok(meta) => Ok(Some(meta.ino())),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Renames the spool file to a fresh batch name, if it holds anything and nobody holds its
    /// lock right now, and returns it as a [`Batch`], locked. Appends after this go to a new
    /// spool file.
    pub fn claim(&self) -> io::Result<Option<Batch>> {
        let Some(locked) = self.lock_file(Duration::ZERO, false)? else {
            return Ok(None);
        };
        if locked.file.metadata()?.len() == 0 {
            return Ok(None);
        }
        let name = self.side_name("batch");
        fs::rename(&self.path, &name)?;
        // No directory fsync: after a crash the lines are found under either name.
        Ok(Some(Batch { file: locked.file, path: name }))
    }

    /// The batch files nobody holds, oldest first, each locked by this process. A temporary file
    /// abandoned by a dead process is renamed into a batch first.
    pub fn batches(&self) -> io::Result<Vec<Batch>> {
        let mut found = Vec::new();
        for path in self.batch_paths()? {
            found.extend(self.adopt(&path)?);
        }
        Ok(found)
    }

    /// The batch files' paths, oldest first, after renaming abandoned temporary files into batches.
    fn batch_paths(&self) -> io::Result<Vec<PathBuf>> {
        let mut paths = Vec::new();
        for side in self.side_files()? {
            if side.batch {
                paths.push(side.path);
            } else if side.pending() {
                let name = self.side_name("batch");
                if fs::rename(&side.path, &name).is_ok() {
                    paths.push(name);
                } // else someone else adopted it
            }
        }
        paths.sort();
        Ok(paths)
    }

    /// The batch at `path`, locked, unless someone holds it or it is gone.
    // `File::try_lock` is stable since Rust 1.89; the workspace's rust-version says 1.85.
    #[allow(clippy::incompatible_msrv)]
    fn adopt(&self, path: &Path) -> io::Result<Option<Batch>> {
        let file = match OpenOptions::new().read(true).open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None), // being flushed
            Err(TryLockError::Error(error)) => return Err(error),
        }
        // Deleted or replaced by the flusher that held it a moment ago: not this copy.
        let inode = file.metadata()?.ino();
        match fs::metadata(path) {
            Ok(meta) if meta.ino() == inode => Ok(Some(Batch { file, path: path.to_path_buf() })),
            Ok(_) => Ok(None),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Hands every spooled event to `insert`, in chunks of up to `max_events` events or about
    /// `max_bytes` (at least one line), batch by batch: the batches nobody holds first, oldest
    /// first, then the spool file (claimed with [`claim`](Self::claim)), unless a batch failed.
    /// What `insert` accepted is dropped; what it did not stays spooled. `Err` only for an IO
    /// error of the spool itself; an insert's failure is in [`Flushed::failure`].
    pub async fn flush<F, Fut>(
        &self,
        max_events: usize,
        max_bytes: usize,
        mut insert: F,
    ) -> io::Result<Flushed>
    where
        F: FnMut(Vec<NewEvent>) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let mut flushed = Flushed::default();
        // Locked one at a time, so that concurrent flushes share the work.
        for path in self.batch_paths()? {
            let Some(batch) = self.adopt(&path)? else { continue };
            if let Err(failure) = batch.drain(max_events, max_bytes, &mut insert, &mut flushed.events).await {
                flushed.failure = Some(failure);
                return Ok(flushed);
            }
        }
        if let Some(batch) = self.claim()? {
            if let Err(failure) = batch.drain(max_events, max_bytes, &mut insert, &mut flushed.events).await {
                flushed.failure = Some(failure);
            }
        }
        Ok(flushed)
    }

    /// [`flush`](Self::flush) with an `insert` that blocks instead of returning a future (the
    /// ingest socket's client, which starts no async runtime). The same batches, order and
    /// guarantees: it is that function, run to completion on the calling thread.
    pub fn flush_blocking<F>(&self, max_events: usize, max_bytes: usize, mut insert: F) -> io::Result<Flushed>
    where
        F: FnMut(Vec<NewEvent>) -> Result<(), String>,
    {
        let flush = self.flush(max_events, max_bytes, |events| std::future::ready(insert(events)));
        let mut flush = std::pin::pin!(flush);
        // `flush` awaits nothing but `insert`'s futures, which are ready: it completes on its
        // first poll, and no waker is ever needed.
        match flush.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
            std::task::Poll::Ready(flushed) => flushed,
            std::task::Poll::Pending => Err(io::Error::other("the spool's flush waited for something")),
        }
    }

    /// Writes `bytes` to a new batch file: a temporary file, `fsync`ed, renamed into place, and
    /// the directory `fsync`ed, so the batch appears whole or not at all.
    fn write_batch(&self, bytes: &[u8]) -> io::Result<PathBuf> {
        self.ensure_dir()?;
        let temporary = self.side_name("tmp");
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        let name = self.side_name("batch");
        fs::rename(&temporary, &name)?;
        sync_dir(&self.path)?;
        Ok(name)
    }

    /// `<spool>.<kind>-<nanoseconds since 1970>-<pid>-<n>`: sorts by time, unique per process.
    fn side_name(&self, kind: &str) -> PathBuf {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{kind}-{nanos:020}-{}-{n}", std::process::id()));
        self.path.with_file_name(name)
    }

    /// The batch and temporary files beside the spool.
    fn side_files(&self) -> io::Result<Vec<SideFile>> {
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let Some(name) = self.path.file_name().and_then(|n| n.to_str()) else {
            return Ok(Vec::new());
        };
        let (batch_prefix, tmp_prefix) = (format!("{name}.batch-"), format!("{name}.tmp-"));
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else { continue };
            let batch = file_name.starts_with(&batch_prefix);
            if batch || file_name.starts_with(&tmp_prefix) {
                let age =
                    entry.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
                found.push(SideFile { path: entry.path(), batch, age });
            }
        }
        Ok(found)
    }

    fn ensure_dir(&self) -> io::Result<()> {
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => {
                fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
            }
            _ => Ok(()),
        }
    }

    fn open(&self) -> io::Result<File> {
        let created = !self.path.exists();
        if created {
            self.ensure_dir()?;
        }
        let file = OpenOptions::new().read(true).append(true).create(true).mode(0o600).open(&self.path)?;
        if created {
            // The new directory entry must survive a crash as much as the lines written to it.
            sync_dir(&self.path)?;
        }
        Ok(file)
    }
}

/// A batch or temporary file found beside the spool.
struct SideFile {
    path: PathBuf,
    batch: bool,
    age: Option<Duration>,
}

impl SideFile {
    /// Whether a flush should pick it up: a batch, or a temporary file its writer abandoned.
    fn pending(&self) -> bool {
        self.batch || self.age.is_some_and(|age| age > ABANDONED)
    }
}

/// The spool file, locked by this process until dropped.
#[derive(Debug)]
pub struct Locked {
    file: File,
}

impl Locked {
    /// Appends `event` as one line and `fsync`s it.
    pub fn append(&mut self, event: &NewEvent) -> io::Result<()> {
        append_line(&self.file, event)
    }
}

/// A batch file, locked by this process: nobody else reads or writes it until it is dropped.
#[derive(Debug)]
pub struct Batch {
    file: File,
    path: PathBuf,
}

impl Batch {
    /// The batch file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads up to `max_events` lines (fewer if they hold over `max_bytes`, but at least one),
    /// starting at byte `from`. Empty lines are skipped. An empty result means the end.
    pub fn read(&mut self, from: u64, max_events: usize, max_bytes: usize) -> io::Result<Vec<Entry>> {
        self.file.seek(SeekFrom::Start(from))?;
        let mut reader = BufReader::new(&self.file);
        let mut entries = Vec::new();
        let mut offset = from;
        let mut bytes = 0;
        let mut buf = Vec::new();
        while entries.len() < max_events && (bytes < max_bytes || entries.is_empty()) {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf)?;
            if n == 0 {
                break;
            }
            offset += n as u64;
            bytes += n;
            let line = buf.trim_ascii();
            if line.is_empty() {
                continue;
            }
            let event = serde_json::from_slice::<NewEvent>(line).unwrap_or_else(|_| unreadable_line(line));
            entries.push(Entry { event, line: String::from_utf8_lossy(line).into_owned(), end: offset });
        }
        Ok(entries)
    }

    /// Drops the first `upto` bytes (everything read and inserted) and releases the batch:
    /// deletes it when nothing follows, else replaces it by a copy of the rest, which the next
    /// flush picks up.
    pub fn finish(self, upto: u64) -> io::Result<()> {
        let len = self.file.metadata()?.len();
        if upto >= len {
            // No directory fsync: a batch that comes back after a crash is inserted again,
            // which stores nothing twice.
            return fs::remove_file(&self.path);
        }
        if upto == 0 {
            return Ok(());
        }
        let mut rest = Vec::new();
        {
            let mut reader = &self.file;
            reader.seek(SeekFrom::Start(upto))?;
            io::Read::read_to_end(&mut reader, &mut rest)?;
        }
        // A temporary name, not a batch name: nobody may pick up a half-written copy.
        let name = self.path.file_name().and_then(|n| n.to_str()).unwrap_or("spool");
        let temporary = self.path.with_file_name(format!("{}-rest", name.replacen(".batch-", ".tmp-", 1)));
        let mut copy =
            OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
        copy.write_all(&rest)?;
        copy.sync_all()?;
        // Atomic: the batch holds all its lines or only the rest, whenever a crash comes.
        fs::rename(&temporary, &self.path)?;
        sync_dir(&self.path)
    }

    /// Hands the batch to `insert` chunk by chunk, then [`finish`](Self::finish)es it with what
    /// went in. `Err` says why it stopped early.
    async fn drain<F, Fut>(
        mut self,
        max_events: usize,
        max_bytes: usize,
        insert: &mut F,
        count: &mut usize,
    ) -> Result<(), String>
    where
        F: FnMut(Vec<NewEvent>) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let mut done = 0;
        let failure = loop {
            let entries = match self.read(done, max_events, max_bytes) {
                Ok(entries) => entries,
                Err(error) => break Some(format!("reading the spool: {error}")),
            };
            let Some(end) = entries.last().map(|entry| entry.end) else { break None };
            let events: Vec<NewEvent> = entries.into_iter().map(|entry| entry.event).collect();
            let n = events.len();
            match insert(events).await {
                Ok(()) => {
                    done = end;
                    *count += n;
                }
                Err(why) => break Some(format!("flushing the spool after {count} events: {why}")),
            }
        };
        let finished = self.finish(done).map_err(|e| format!("updating the spool after flushing: {e}"));
        match (failure, finished) {
            (Some(failure), _) => Err(failure),
            (None, Err(error)) => Err(error),
            (None, Ok(())) => Ok(()),
        }
    }
}

/// Writes `event` as one line with a single `write` (on a fresh line, should the last write
/// have been torn), then `fsync`s.
fn append_line(file: &File, event: &NewEvent) -> io::Result<()> {
    let mut line = Vec::with_capacity(512);
    let len = file.metadata()?.len();
    if len > 0 {
        let mut last = [0u8];
        file.read_exact_at(&mut last, len - 1)?;
        if last[0] != b'\n' {
            line.push(b'\n');
        }
    }
    serde_json::to_writer(&mut line, event).map_err(io::Error::other)?;
    line.push(b'\n');
    (&mut &*file).write_all(&line)?;
    file.sync_data()
}

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// The raw record of a spool line that does not parse, with an id derived from its bytes.
fn unreadable_line(line: &[u8]) -> NewEvent {
    NewEvent::new(INGEST_SOURCE, "malformed_spool_line", "spool", "unknown")
        .with_id(content_id(line))
        .with_payload(sanitized(json!({"raw": String::from_utf8_lossy(line)})))
}

/// A UUID (version 8) from a 128-bit FNV-1a hash of `bytes`: the same bytes, the same id.
pub(crate) fn content_id(bytes: &[u8]) -> Uuid {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let hash = bytes.iter().fold(OFFSET, |hash, &byte| (hash ^ u128::from(byte)).wrapping_mul(PRIME));
    Builder::from_custom_bytes(hash.to_be_bytes()).into_uuid()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("hook-ingest-spool-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            Scratch(dir)
        }

        /// The names of the files in the spool's directory, sorted.
        fn files(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.0)
                .map(|entries| {
                    entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
                })
                .unwrap_or_default();
            names.sort();
            names
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn event(n: usize) -> NewEvent {
        NewEvent::new("Stop", "response_completed", "session", format!("s{n}"))
    }

    fn block_on<T>(future: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
    }

    /// Flushes everything into a vector, the way a healthy database would take it.
    fn flush_all(spool: &Spool) -> Vec<NewEvent> {
        let taken = Mutex::new(Vec::new());
        let flushed = block_on(spool.flush(usize::MAX, usize::MAX, |events| {
            taken.lock().unwrap().extend(events);
            async { Ok(()) }
        }))
        .unwrap();
        assert_eq!(flushed.failure, None);
        taken.into_inner().unwrap()
    }

    #[test]
    fn appended_events_flush_in_order_and_leave_nothing_behind() {
        let scratch = Scratch::new("order");
        let spool = Spool::new(scratch.0.join("deep/dir/spool.jsonl"));
        assert!(spool.is_empty());
        let events: Vec<NewEvent> = (0..5).map(event).collect();
        for e in &events {
            assert_eq!(spool.append(e).unwrap(), Appended::Spool);
        }
        assert!(!spool.is_empty());
        let mode = fs::metadata(spool.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(scratch.0.join("deep/dir")).unwrap().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert_eq!(flush_all(&spool), events);
        assert!(spool.is_empty());
        assert_eq!(
            Scratch(scratch.0.join("deep/dir")).files(),
            Vec::<String>::new(),
            "the claimed batch is gone"
        );
    }

    #[test]
    fn chunks_respect_their_limits_and_finish_keeps_the_rest() {
        let scratch = Scratch::new("chunks");
        let spool = Spool::new(scratch.0.join("spool.jsonl"));
        let events: Vec<NewEvent> = (0..7).map(event).collect();
        for e in &events {
            spool.append(e).unwrap();
        }
        let mut batch = spool.claim().unwrap().expect("a batch");
        assert!(!spool.path().exists(), "claiming renames the spool away");
        let first = batch.read(0, 3, usize::MAX).unwrap();
        assert_eq!(first.len(), 3);
        let second = batch.read(first[2].end, 3, 1).unwrap();
        assert_eq!(second.len(), 1, "at least one line even over the byte limit");
        batch.finish(second[0].end).unwrap();
        assert_eq!(flush_all(&spool), events[4..]);
        assert_eq!(scratch.files(), Vec::<String>::new());
    }

    #[test]
    fn a_torn_line_becomes_a_raw_record_and_later_lines_stay_whole() {
        let scratch = Scratch::new("torn");
        let spool = Spool::new(scratch.0.join("spool.jsonl"));
        spool.append(&event(0)).unwrap();
        let mut file = OpenOptions::new().append(true).open(spool.path()).unwrap();
        file.write_all(br#"{"id":"0190"#).unwrap();
        spool.append(&event(2)).unwrap();
        let entries = flush_all(&spool);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].resource_id, "s0");
        assert_eq!(entries[1].action, "malformed_spool_line");
        assert_eq!(entries[1].payload, json!({"raw": r#"{"id":"0190"#}));
        assert_eq!(entries[1].id, content_id(br#"{"id":"0190"#), "the same line, the same id");
        assert_eq!(entries[2].resource_id, "s2");
        assert_eq!(content_id(b"a").get_version_num(), 8);
        assert_ne!(content_id(b"a"), content_id(b"b"));
    }

    #[test]
    fn a_writer_never_waits_for_a_flush_nor_writes_to_a_claimed_file() {
        let scratch = Scratch::new("moved");
        let spool = Spool::new(scratch.0.join("spool.jsonl"));
        spool.append(&event(0)).unwrap();
        // An appender holds the lock; a writer starts waiting for it; then the file is renamed
        // away (as a claim does) and the lock kept for much longer than the writer's patience.
        let held = spool.lock(Duration::ZERO).unwrap().unwrap();
        let writer = {
            let spool = spool.clone();
            std::thread::spawn(move || {
                let begun = Instant::now();
                (spool.append(&event(1)), begun.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let claimed = scratch.0.join("spool.jsonl.batch-00000000000000000001-0-0");
        fs::rename(spool.path(), &claimed).unwrap();
        let (appended, waited) = writer.join().unwrap();
        assert_eq!(appended.unwrap(), Appended::Spool, "to the new spool file");
        assert!(waited < APPEND_PATIENCE, "moved on as soon as the path changed: {waited:?}");
        drop(held);
        let old = fs::read_to_string(&claimed).unwrap();
        assert_eq!(old.lines().count(), 1, "nothing was appended to the claimed file");
        let all: Vec<String> = flush_all(&spool).into_iter().map(|e| e.resource_id).collect();
        assert_eq!(all, ["s0", "s1"]);
    }

    #[test]
    fn a_frozen_holder_makes_a_writer_use_a_batch_of_its_own() {
        let scratch = Scratch::new("frozen");
        let spool = Spool::new(scratch.0.join("spool.jsonl")).with_append_patience(Duration::from_millis(50));
        spool.append(&event(0)).unwrap();
        let held = spool.lock(Duration::ZERO).unwrap().unwrap();
        assert_eq!(spool.append(&event(1)).unwrap(), Appended::OwnBatch);
        assert!(spool.claim().unwrap().is_none(), "a claim does not wait for the holder");
        let batches = spool.batches().unwrap();
        assert_eq!(batches.len(), 1);
        drop(batches);
        drop(held);
        let mut all: Vec<String> = flush_all(&spool).into_iter().map(|e| e.resource_id).collect();
        all.sort();
        assert_eq!(all, ["s0", "s1"]);
        assert_eq!(scratch.files(), Vec::<String>::new());
    }

    #[test]
    fn a_failing_flush_keeps_its_batch_and_claims_no_more() {
        let scratch = Scratch::new("failing");
        let spool = Spool::new(scratch.0.join("spool.jsonl"));
        let refuse = |spool: &Spool| {
            block_on(spool.flush(2, usize::MAX, |_| async { Err::<(), _>("no table".to_owned()) })).unwrap()
        };
        for n in 0..5 {
            spool.append(&event(n)).unwrap();
            let flushed = refuse(&spool);
            assert_eq!(flushed.events, 0);
            assert!(flushed.failure.unwrap().contains("no table"));
        }
        let files = scratch.files();
        assert_eq!(files.len(), 2, "one batch plus the spool, not a batch per run: {files:?}");
        // Part way: the old batch (s0) and the next chunk (s1, s2) go in, then a chunk fails;
        // the rest stays, in a batch of its own.
        let calls = Mutex::new(0);
        let flushed = block_on(spool.flush(2, usize::MAX, |_| {
            let mut calls = calls.lock().unwrap();
            *calls += 1;
            let ok = *calls <= 2;
            async move {
                if ok {
                    Ok(())
                } else {
                    Err("cut off".to_owned())
                }
            }
        }))
        .unwrap();
        assert_eq!((flushed.events, flushed.failure.is_some()), (3, true));
        let rest: Vec<String> = flush_all(&spool).into_iter().map(|e| e.resource_id).collect();
        assert_eq!(rest, ["s3", "s4"]);
        assert!(spool.is_empty());
    }

    #[test]
    fn a_blocking_flush_is_the_same_flush() {
        let scratch = Scratch::new("blocking");
        let spool = Spool::new(scratch.0.join("spool.jsonl"));
        for n in 0..5 {
            spool.append(&event(n)).unwrap();
        }
        let mut taken = Vec::new();
        let flushed = spool
            .flush_blocking(2, usize::MAX, |events| {
                if !taken.is_empty() {
                    return Err("cut off".to_owned());
                }
                taken.extend(events);
                Ok(())
            })
            .unwrap();
        assert_eq!(flushed.events, 2);
        assert!(flushed.failure.unwrap().contains("flushing the spool after 2 events: cut off"));
        let taken: Vec<String> = taken.into_iter().map(|e| e.resource_id).collect();
        assert_eq!(taken, ["s0", "s1"]);
        let rest: Vec<String> = flush_all(&spool).into_iter().map(|e| e.resource_id).collect();
        assert_eq!(rest, ["s2", "s3", "s4"], "what was not taken stays, in order");
        assert_eq!(scratch.files(), Vec::<String>::new());
    }

    #[test]
    fn an_abandoned_temporary_file_is_picked_up() {
        let scratch = Scratch::new("abandoned");
        let spool = Spool::new(scratch.0.join("spool.jsonl"));
        fs::create_dir_all(&scratch.0).unwrap();
        let tmp = scratch.0.join("spool.jsonl.tmp-00000000000000000001-1-0");
        let mut line = serde_json::to_vec(&event(7)).unwrap();
        line.push(b'\n');
        fs::write(&tmp, &line).unwrap();
        assert!(spool.is_empty(), "a fresh temporary file belongs to a writer still at work");
        let old = SystemTime::now() - ABANDONED - Duration::from_secs(60);
        File::options().write(true).open(&tmp).unwrap().set_modified(old).unwrap();
        assert!(!spool.is_empty());
        let all: Vec<String> = flush_all(&spool).into_iter().map(|e| e.resource_id).collect();
        assert_eq!(all, ["s7"]);
        assert_eq!(scratch.files(), Vec::<String>::new());
    }

    /// The acceptance test of the spool: 1,000 appends from 50 threads while flushers work
    /// slowly (each chunk's insert pauses inside the flush, with its batch claimed), fail part
    /// way, and while the spool's lock is held past the writers' patience again and again.
    /// Every appended event reaches the "database" at least once (inserts skip ids already
    /// there, so at least once is exactly once), and nothing is left in the spool.
    #[test]
    fn no_timing_loses_an_append() {
        const WRITERS: usize = 50;
        const EACH: usize = 20;
        let scratch = Scratch::new("race");
        let spool = Spool::new(scratch.0.join("spool.jsonl")).with_append_patience(Duration::from_millis(30));
        let inserted = Arc::new(Mutex::new(HashSet::new()));
        let writing = Arc::new(AtomicBool::new(true));

        let flusher = |n: usize| {
            let (spool, inserted, writing) = (spool.clone(), Arc::clone(&inserted), Arc::clone(&writing));
            std::thread::spawn(move || {
                let mut chunk = 0usize;
                while writing.load(Ordering::SeqCst) {
                    block_on(spool.flush(7, usize::MAX, |events| {
                        chunk += 1;
                        // Paused inside the critical section, its batch claimed.
                        std::thread::sleep(Duration::from_millis(1 + (chunk % 4) as u64 * 2));
                        // Every ninth chunk is "cut off by the deadline": it may have committed
                        // (recorded) or not, and is reported as failed either way.
                        let cut_off = (chunk + n).is_multiple_of(9);
                        if !cut_off || chunk.is_multiple_of(2) {
                            inserted.lock().unwrap().extend(events.iter().map(|e| e.id));
                        }
                        async move {
                            if cut_off {
                                Err("cut off".to_owned())
                            } else {
                                Ok(())
                            }
                        }
                    }))
                    .unwrap();
                }
                chunk
            })
        };
        let started = Instant::now();
        let flushers = [flusher(0), flusher(1)];
        let holder = {
            let (spool, writing) = (spool.clone(), Arc::clone(&writing));
            std::thread::spawn(move || {
                while writing.load(Ordering::SeqCst) {
                    // A frozen appender: the lock held past every writer's patience.
                    if let Ok(Some(held)) = spool.lock(Duration::from_millis(100)) {
                        std::thread::sleep(Duration::from_millis(50));
                        drop(held);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let spool = spool.clone();
                std::thread::spawn(move || {
                    let mut ids = Vec::new();
                    let mut own_batches = 0;
                    for i in 0..EACH {
                        let event = event(w * EACH + i);
                        if spool.append(&event).unwrap() == Appended::OwnBatch {
                            own_batches += 1;
                        }
                        ids.push(event.id);
                        std::thread::sleep(Duration::from_millis(((w + i) % 5) as u64 * 25));
                    }
                    (ids, own_batches)
                })
            })
            .collect();
        let mut appended = Vec::new();
        let mut own_batches = 0;
        for writer in writers {
            let (ids, own) = writer.join().unwrap();
            appended.extend(ids);
            own_batches += own;
        }
        writing.store(false, Ordering::SeqCst);
        let (writing_took, during) = (started.elapsed(), inserted.lock().unwrap().len());
        let chunks: usize = flushers.into_iter().map(|f| f.join().unwrap()).sum();
        holder.join().unwrap();
        let rest = flush_all(&spool);
        let mut inserted = inserted.lock().unwrap().clone();
        inserted.extend(rest.iter().map(|e| e.id));

        assert_eq!(appended.len(), WRITERS * EACH);
        let lost: Vec<&Uuid> = appended.iter().filter(|id| !inserted.contains(id)).collect();
        eprintln!(
            "{} appends in {writing_took:?}, {own_batches} to a batch of their own; {during} flushed \
             meanwhile in {chunks} chunks, {} left for the last flush; {} lost",
            appended.len(),
            rest.len(),
            lost.len()
        );
        assert!(lost.is_empty(), "{} of {} appends lost", lost.len(), appended.len());
        assert!(own_batches > 0, "the frozen holder made some writers use their own batch");
        assert!(spool.is_empty());
        let left: Vec<String> = scratch.files().into_iter().filter(|f| f != "spool.jsonl").collect();
        assert!(left.is_empty(), "no batch or temporary file left: {left:?}");
    }
}
