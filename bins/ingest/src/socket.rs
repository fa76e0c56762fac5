//! The fast path: handing the event to a running `hook-processor` through its ingest socket
//! (the protocol is [`crate::wire`]), which inserts it on a connection it keeps open, together
//! with whatever other hooks sent at the same moment, and answers once it is committed.
//!
//! Blocking std IO with a timeout on every call: no async runtime is started for this path, and
//! nothing is done before it but reading stdin and building the event. The socket gets a short
//! part of the hook's budget ([`SOCKET_BUDGET`], at most half of it); when it does not answer
//! `stored` in that time (no processor, a processor without its database, one killed before it
//! answered), [`crate::deliver`] goes on with the database and then the spool, exactly as if
//! there were no socket. The event's id is the same on every path, so an event the processor
//! committed without answering is not stored twice.
//!
//! A non-empty spool is flushed through the socket first, in order, like the database path does,
//! so that hooks that cannot reach the database themselves (only the processor has its
//! credentials) still drain the spool once the processor is back.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hook_core::NewEvent;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::deliver::{CHUNK_EVENTS, SOCKET_CHUNK_BYTES};
use crate::spool::Spool;
use crate::wire::{self, Answer, MAX_REQUEST};

/// The part of the hook's budget the socket may take, at most, when the database is the next
/// path to try. Half the budget when that is shorter.
pub const SOCKET_BUDGET: Duration = Duration::from_millis(100);

/// The longest answer line read.
const MAX_ANSWER: usize = 4096;

/// What the socket did with the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed by the processor.
    Stored,
    /// No processor listens on any of the sockets (none exists, or the last one to listen is
    /// gone): a normal state, nothing to report.
    NoProcessor,
    /// A processor was reached but the event is not known to be stored; why.
    Failed(String),
}

/// Sends `event` through the first of `sockets` that a processor listens on, after the spool's
/// events if the spool holds any (unless another hook is flushing it right now), all before
/// `deadline`.
pub fn deliver(sockets: &[PathBuf], spool: &Spool, event: &NewEvent, deadline: Instant) -> Outcome {
    let found = match connect_first(sockets, deadline) {
        Ok(found) => found,
        Err(why) => return Outcome::Failed(why),
    };
    let Some((path, first)) = found else { return Outcome::NoProcessor };
    let mut stream = Some(first);
    // A connection per request: the first one is already open.
    let mut request = |events: &[NewEvent]| -> Result<(), String> {
        let stream = match stream.take() {
            Some(stream) => stream,
            None => connect(path, deadline).map_err(|e| format!("connecting to {}: {e}", path.display()))?,
        };
        send(stream, events, deadline).map_err(|why| format!("the processor at {}: {why}", path.display()))
    };
    if !spool.is_empty() {
        if let Err(why) = flush(spool, &mut request) {
            return Outcome::Failed(why);
        }
    }
    match request(std::slice::from_ref(event)) {
        Ok(()) => Outcome::Stored,
        Err(why) => Outcome::Failed(why),
    }
}

/// The deadline of the socket attempt: [`SOCKET_BUDGET`] (or half the budget, if shorter) from
/// `started`, or the whole budget when there is no database to try next.
pub fn socket_deadline(started: Instant, budget: Duration, database_next: bool) -> Instant {
    if database_next {
        started + SOCKET_BUDGET.min(budget / 2)
    } else {
        started + budget
    }
}

/// Sends the spool's events through `request` in order, chunk by chunk, with
/// [`Spool::flush_blocking`]: the batches nobody holds, then the spool file, claimed by renaming
/// it (what another hook is flushing right now is left to it). Stops at the first chunk that is
/// not stored; that chunk and the rest stay spooled, and the database path carries on from there
/// (a chunk the processor committed without answering is skipped by id when it is sent again).
fn flush(spool: &Spool, request: &mut impl FnMut(&[NewEvent]) -> Result<(), String>) -> Result<(), String> {
    let flushed = spool
        .flush_blocking(CHUNK_EVENTS, SOCKET_CHUNK_BYTES, |events| request(&events))
        .map_err(|error| format!("reading the spool {}: {error}", spool.path().display()))?;
    match flushed.failure {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// Connects to the first socket a processor listens on. `Ok(None)`: none does. A socket that
/// exists but cannot be used (permissions, a full backlog) is skipped too, and named in the error
/// if no later one answers.
fn connect_first(sockets: &[PathBuf], deadline: Instant) -> Result<Option<(&Path, UnixStream)>, String> {
    let mut problems = Vec::new();
    for path in sockets {
        match connect(path, deadline) {
            Ok(stream) => return Ok(Some((path, stream))),
            Err(error) if no_listener(&error) => {}
            Err(error) => problems.push(format!("connecting to {}: {error}", path.display())),
        }
    }
    if problems.is_empty() {
        Ok(None)
    } else {
        Err(problems.join("; "))
    }
}

/// Whether connecting failed because nobody listens there: no socket file, or a stale one.
fn no_listener(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
}

/// Connects without blocking on a processor that accepts nothing (its backlog full): a
/// non-blocking connect fails at once then, where a blocking one would wait indefinitely.
fn connect(path: &Path, deadline: Instant) -> io::Result<UnixStream> {
    let address = SockAddr::unix(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.connect_timeout(&address, remaining(deadline)?)?;
    Ok(UnixStream::from(socket))
}

/// Sends one request and reads its answer, before `deadline`.
fn send(mut stream: UnixStream, events: &[NewEvent], deadline: Instant) -> Result<(), String> {
    let request = wire::encode_request(events).map_err(|e| format!("encoding the request: {e}"))?;
    if request.len() > MAX_REQUEST {
        return Err(format!("a request of {} bytes is over the socket's {MAX_REQUEST}", request.len()));
    }
    let timed_out = |error: io::Error| match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "no answer in time".to_owned(),
        _ => error.to_string(),
    };
    let mut written = 0;
    while written < request.len() {
        stream.set_write_timeout(Some(remaining(deadline).map_err(timed_out)?)).map_err(timed_out)?;
        match stream.write(&request[written..]) {
            Ok(0) => return Err("the connection was closed while sending".into()),
            Ok(n) => written += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(timed_out(error)),
        }
    }
    let mut answer = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !answer.contains(&b'\n') && answer.len() < MAX_ANSWER {
        stream.set_read_timeout(Some(remaining(deadline).map_err(timed_out)?)).map_err(timed_out)?;
        match stream.read(&mut buf) {
            // Closed without a (whole) answer: killed, or stopping. Nothing is known.
            Ok(0) => return Err("the connection was closed before the answer".into()),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(timed_out(error)),
        }
    }
    let line = String::from_utf8_lossy(&answer);
    match Answer::parse(line.lines().next().unwrap_or_default()) {
        Some(Answer::Stored(n)) if n == events.len() => Ok(()),
        Some(Answer::Stored(n)) => Err(format!("stored {n} of {} events", events.len())),
        Some(Answer::Error(why)) => Err(why),
        None => Err(format!("not an answer: {:?}", line.trim_end())),
    }
}

/// The time left until `deadline`; an error once it has passed (a zero timeout means none).
fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::from(io::ErrorKind::TimedOut));
    }
    Ok(left)
}
