//! The spool: events that could not be inserted, kept until a later run can.
//!
//! One file, one JSON line per event (a [`NewEvent`], its id already assigned), appended and
//! `fsync`ed before the hook exits. Every reader and writer holds an exclusive `flock` on the
//! file, so concurrent hooks never interleave their lines and a flush never loses a line appended
//! while it ran.
//!
//! A flush reads the spool in chunks from the start, inserts each chunk (skipping ids already in
//! the table), and then drops what it inserted: the file is truncated when everything went in, or
//! replaced by a copy of the rest (written to a temporary file and renamed over it) when the
//! time ran out first. A process that waited for the lock of a file that was replaced meanwhile
//! notices (the path names another inode now) and opens the new one.
//!
//! A line that cannot be read back (a write torn by a crash) becomes a raw record,
//! `hook-ingest/malformed_spool_line` with `payload = {"raw": <the line>}`, whose id is derived
//! from the line's bytes, so reading it twice still stores it once.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hook_core::NewEvent;
use serde_json::json;
use uuid::{Builder, Uuid};

use crate::mapping::{sanitized, INGEST_SOURCE};

/// How long a writer waits for the lock before it appends without it (see [`Spool::append`]).
pub const APPEND_PATIENCE: Duration = Duration::from_secs(2);

/// How often a waiting process tries the lock again.
const LOCK_RETRY: Duration = Duration::from_millis(1);

/// A spool file, by path.
#[derive(Debug, Clone)]
pub struct Spool {
    path: PathBuf,
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

impl Spool {
    /// The spool at `path` (nothing is created until something is appended).
    pub fn new(path: impl Into<PathBuf>) -> Spool {
        Spool { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the spool holds anything. One `stat`, no lock: the fast path of every run.
    pub fn is_empty(&self) -> bool {
        fs::metadata(&self.path).map_or(true, |meta| meta.len() == 0)
    }

    /// Appends `event` as one line and `fsync`s it.
    ///
    /// Waits up to [`APPEND_PATIENCE`] for the lock. A holder keeps it only for one time budget,
    /// so that wait ends only if the holder is frozen (stopped, or its machine suspended); the line
    /// is then appended without the lock rather than dropped. `O_APPEND` still keeps it whole, and
    /// the one way to lose it is for the frozen holder to wake between reading and truncating.
    pub fn append(&self, event: &NewEvent) -> io::Result<()> {
        match self.lock(APPEND_PATIENCE)? {
            Some(mut locked) => locked.append(event),
            None => append_line(&self.open()?, event),
        }
    }

    /// Takes the lock, waiting up to `patience`; `None` when another process holds it that long.
    /// Creates the file (and its directory, private to the user) if missing.
    // `File::try_lock` is stable since Rust 1.89, the workspace's rust-version.
    #[allow(clippy::incompatible_msrv)]
    pub fn lock(&self, patience: Duration) -> io::Result<Option<Locked>> {
        let give_up = Instant::now() + patience;
        loop {
            let file = self.open()?;
            loop {
                match file.try_lock() {
                    Ok(()) => break,
                    Err(TryLockError::WouldBlock) if Instant::now() < give_up => {
                        std::thread::sleep(LOCK_RETRY)
                    }
                    Err(TryLockError::WouldBlock) => return Ok(None),
                    Err(TryLockError::Error(error)) => return Err(error),
                }
            }
            // A flush may have replaced the file while we waited: lock the one the path names.
            let locked_inode = file.metadata()?.ino();
            match fs::metadata(&self.path) {
                Ok(meta) if meta.ino() == locked_inode => {
                    return Ok(Some(Locked { file, path: self.path.clone() }));
                }
                Ok(_) => continue,
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            }
        }
    }

    fn open(&self) -> io::Result<File> {
        let created = !self.path.exists();
        if created {
            if let Some(dir) = self.path.parent() {
                fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            }
        }
        let file = OpenOptions::new().read(true).append(true).create(true).mode(0o600).open(&self.path)?;
        if created {
            // The new directory entry must survive a crash as much as the lines written to it.
            sync_dir(&self.path)?;
        }
        Ok(file)
    }
}

/// The spool, locked by this process until dropped.
#[derive(Debug)]
pub struct Locked {
    file: File,
    path: PathBuf,
}

impl Locked {
    /// Appends `event` as one line and `fsync`s it.
    pub fn append(&mut self, event: &NewEvent) -> io::Result<()> {
        append_line(&self.file, event)
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

    /// Drops the first `upto` bytes (everything read and inserted), keeping whatever follows:
    /// truncates when nothing follows, else replaces the file by a copy of the rest.
    pub fn discard(self, upto: u64) -> io::Result<()> {
        if upto == 0 {
            return Ok(());
        }
        let len = self.file.metadata()?.len();
        if upto >= len {
            self.file.set_len(0)?;
            return self.file.sync_all();
        }
        let mut rest = Vec::new();
        {
            let mut reader = &self.file;
            reader.seek(SeekFrom::Start(upto))?;
            io::Read::read_to_end(&mut reader, &mut rest)?;
        }
        let temporary = self.path.with_extension(format!("tmp-{}", std::process::id()));
        let mut copy =
            OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
        copy.write_all(&rest)?;
        copy.sync_all()?;
        fs::rename(&temporary, &self.path)?;
        sync_dir(&self.path)
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
    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("hook-ingest-spool-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            Scratch(dir)
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

    fn read_all(spool: &Spool) -> Vec<Entry> {
        spool.lock(Duration::ZERO).unwrap().unwrap().read(0, usize::MAX, usize::MAX).unwrap()
    }

    #[test]
    fn appended_events_read_back_in_order() {
        let scratch = Scratch::new("order");
        let spool = Spool::new(scratch.0.join("deep/dir/spool.jsonl"));
        assert!(spool.is_empty());
        let events: Vec<NewEvent> = (0..5).map(event).collect();
        for e in &events {
            spool.append(e).unwrap();
        }
        assert!(!spool.is_empty());
        let read: Vec<NewEvent> = read_all(&spool).into_iter().map(|e| e.event).collect();
        assert_eq!(read, events);
        let mode = fs::metadata(spool.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn chunks_respect_their_limits_and_discard_keeps_the_rest() {
        let scratch = Scratch::new("chunks");
        let spool = Spool::new(scratch.0.join("spool.jsonl"));
        let events: Vec<NewEvent> = (0..7).map(event).collect();
        for e in &events {
            spool.append(e).unwrap();
        }
        let mut locked = spool.lock(Duration::ZERO).unwrap().unwrap();
        let first = locked.read(0, 3, usize::MAX).unwrap();
        assert_eq!(first.len(), 3);
        let second = locked.read(first[2].end, 3, 1).unwrap();
        assert_eq!(second.len(), 1, "at least one line even over the byte limit");
        locked.discard(second[0].end).unwrap();
        let rest: Vec<NewEvent> = read_all(&spool).into_iter().map(|e| e.event).collect();
        assert_eq!(rest, events[4..]);
        let end = fs::metadata(spool.path()).unwrap().len();
        spool.lock(Duration::ZERO).unwrap().unwrap().discard(end).unwrap();
        assert!(spool.is_empty());
    }

    #[test]
    fn a_torn_line_becomes_a_raw_record_and_later_lines_stay_whole() {
        let scratch = Scratch::new("torn");
        let spool = Spool::new(scratch.0.join("spool.jsonl"));
        spool.append(&event(0)).unwrap();
        let mut file = OpenOptions::new().append(true).open(spool.path()).unwrap();
        file.write_all(br#"{"id":"0190"#).unwrap();
        spool.append(&event(2)).unwrap();
        let entries = read_all(&spool);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].event, event_with_id(&entries[0].event, 0));
        assert_eq!(entries[1].event.action, "malformed_spool_line");
        assert_eq!(entries[1].event.payload, json!({"raw": r#"{"id":"0190"#}));
        assert_eq!(entries[1].event.id, content_id(br#"{"id":"0190"#), "the same line, the same id");
        assert_eq!(entries[2].event.resource_id, "s2");
    }

    fn event_with_id(e: &NewEvent, n: usize) -> NewEvent {
        event(n).with_id(e.id)
    }

    #[test]
    fn a_held_lock_makes_others_wait_and_a_replaced_file_is_followed() {
        let scratch = Scratch::new("lock");
        let spool = Spool::new(scratch.0.join("spool.jsonl"));
        for n in 0..3 {
            spool.append(&event(n)).unwrap();
        }
        let held = spool.lock(Duration::ZERO).unwrap().unwrap();
        assert!(spool.lock(Duration::from_millis(20)).unwrap().is_none(), "busy");
        let writer = {
            let spool = spool.clone();
            std::thread::spawn(move || spool.append(&event(9)))
        };
        std::thread::sleep(Duration::from_millis(50));
        // Replace the file under the waiting writer: it must append to the new one.
        let mut held = held;
        let entries = held.read(0, 1, usize::MAX).unwrap();
        held.discard(entries[0].end).unwrap();
        writer.join().unwrap().unwrap();
        let rest: Vec<String> = read_all(&spool).into_iter().map(|e| e.event.resource_id).collect();
        assert_eq!(rest, ["s1", "s2", "s9"]);
        assert_eq!(content_id(b"a"), content_id(b"a"));
        assert_ne!(content_id(b"a"), content_id(b"b"));
        assert_eq!(content_id(b"a").get_version_num(), 8);
    }
}
