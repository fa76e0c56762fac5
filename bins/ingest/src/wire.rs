//! The protocol of the ingest socket, the local Unix socket on which a running `hook-processor`
//! accepts events from `hook-ingest`: what both sides say, and where the socket is. The client
//! ([`crate::socket`]) and the server ([`crate::server`]) both speak it through this module, so
//! it is defined once.
//!
//! One request per connection:
//!
//! - **request** (client → server): one or more events, each one line of compact JSON, exactly a
//!   spool line ([`NewEvent`] with its id already assigned), then an empty line. A request ends at
//!   its empty line; a connection closed before it sent one is not a request, and nothing of it is
//!   stored. At most [`MAX_REQUEST`] bytes.
//! - **answer** (server → client): one line, then the server closes the connection:
//!   `stored <n>` once all `n` events are committed (inserted, or already in the table), or
//!   `error <why>` when none is known to be (the client then stores them another way).
//!
//! Every event keeps its id on every path, and every insert skips an id already stored, so a
//! client that got no answer (the server died after its commit) can store the same events
//! through the database or its spool without doubling them.

use std::path::{Path, PathBuf};

use hook_core::NewEvent;

/// The largest request, in bytes: a hook's largest input ([`crate::mapping::MAX_INPUT`], 16
/// MiB) as one event, with room for its metadata and a few more events.
pub const MAX_REQUEST: usize = 18 * 1024 * 1024;

/// The variable that names the socket, in `hook-processor` and `hook-ingest` alike: a path, or
/// `off`.
pub const SOCKET_VARIABLE: &str = "HOOK_INGEST_SOCKET";

/// The socket's file name in its directory.
pub const SOCKET_NAME: &str = "ingest.sock";

/// The system service's socket (the unit's `RuntimeDirectory=hook-events`).
pub const SYSTEM_SOCKET: &str = "/run/hook-events/ingest.sock";

/// The word that starts a successful answer.
const STORED: &str = "stored";

/// The word that starts a failed answer.
const ERROR: &str = "error";

/// Where `hook-ingest` looks for the socket when `HOOK_INGEST_SOCKET` is not set, in order: the
/// user service's (`$XDG_RUNTIME_DIR/hook-events/ingest.sock`, when `XDG_RUNTIME_DIR` is an
/// absolute path), then the system service's ([`SYSTEM_SOCKET`]).
pub fn default_sockets(xdg_runtime_dir: Option<&str>) -> Vec<PathBuf> {
    let user = xdg_runtime_dir
        .map(Path::new)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join("hook-events").join(SOCKET_NAME));
    user.into_iter().chain([PathBuf::from(SYSTEM_SOCKET)]).collect()
}

/// The bytes of a request holding `events`.
///
/// # Errors
/// When an event cannot be serialized (a map with non-string keys cannot occur in a
/// [`serde_json::Value`], so in practice never).
pub fn encode_request(events: &[NewEvent]) -> Result<Vec<u8>, serde_json::Error> {
    let mut bytes = Vec::with_capacity(512 * events.len().max(1));
    for event in events {
        serde_json::to_writer(&mut bytes, event)?;
        bytes.push(b'\n');
    }
    bytes.push(b'\n');
    Ok(bytes)
}

/// Where the request in `buffer` ends: the index just past its empty line, or `None` when the
/// empty line has not arrived yet. `searched` is how many bytes earlier calls have already looked
/// at, so that a growing buffer is scanned once.
pub fn request_end(buffer: &[u8], searched: usize) -> Option<usize> {
    if buffer.first() == Some(&b'\n') {
        return Some(1);
    }
    let from = searched.saturating_sub(1);
    let tail = buffer.get(from..)?;
    memchr::memmem::find(tail, b"\n\n").map(|at| from + at + 2)
}

/// The events of a complete request (`request` up to and including its empty line).
///
/// # Errors
/// The first line that is not an event, as text for the answer.
pub fn decode_request(request: &[u8]) -> Result<Vec<NewEvent>, String> {
    request
        .split(|&byte| byte == b'\n')
        .filter(|line| !line.is_empty())
        .enumerate()
        .map(|(n, line)| {
            serde_json::from_slice::<NewEvent>(line)
                .map_err(|e| format!("line {} is not an event: {e}", n + 1))
        })
        .collect()
}

/// What the server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// All the request's events are committed; how many there were.
    Stored(usize),
    /// None of them is known to be stored; why.
    Error(String),
}

impl Answer {
    /// The answer as it is sent: one line, ending in `\n`.
    pub fn to_line(&self) -> String {
        match self {
            Answer::Stored(n) => format!("{STORED} {n}\n"),
            Answer::Error(why) => format!("{ERROR} {}\n", why.replace(['\n', '\r'], " ")),
        }
    }

    /// Reads an answer line (with or without its `\n`); `None` when it is not one.
    pub fn parse(line: &str) -> Option<Answer> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let (word, rest) = line.split_once(' ')?;
        match word {
            STORED => rest.parse().ok().map(Answer::Stored),
            ERROR => Some(Answer::Error(rest.to_owned())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> NewEvent {
        NewEvent::new("Stop", "response_completed", "session", format!("s{n}"))
    }

    #[test]
    fn a_request_round_trips_and_ends_at_its_empty_line() {
        let events: Vec<NewEvent> = (0..3).map(event).collect();
        let bytes = encode_request(&events).unwrap();
        assert!(bytes.ends_with(b"}\n\n"));
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 4, "one line per event, then an empty one");
        // However the bytes arrive, the end is found once they are all there.
        for split in 0..bytes.len() {
            let first = request_end(&bytes[..split], 0);
            assert_eq!(first, None, "not complete after {split} bytes");
            assert_eq!(request_end(&bytes, split), Some(bytes.len()), "searched {split}");
        }
        assert_eq!(decode_request(&bytes).unwrap(), events);
        assert_eq!(request_end(b"\n", 0), Some(1));
        assert_eq!(decode_request(b"\n").unwrap(), []);
        assert_eq!(encode_request(&[]).unwrap(), b"\n");
    }

    #[test]
    fn bad_lines_are_named() {
        let mut bytes = encode_request(&[event(0)]).unwrap();
        bytes.splice(0..0, b"{\"id\": 1}\n".iter().copied());
        let error = decode_request(&bytes).unwrap_err();
        assert!(error.starts_with("line 1 is not an event"), "{error}");
    }

    #[test]
    fn answers_round_trip() {
        for answer in [Answer::Stored(0), Answer::Stored(500), Answer::Error("database down: refused".into())]
        {
            let line = answer.to_line();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "{line:?}");
            assert_eq!(Answer::parse(&line), Some(answer));
        }
        assert_eq!(Answer::Error("a\nb".into()).to_line(), "error a b\n");
        for bad in ["", "stored", "stored x", "ok 1", "STORED 1"] {
            assert_eq!(Answer::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_default_sockets_are_the_user_services_then_the_system_services() {
        assert_eq!(
            default_sockets(Some("/run/user/1000")),
            [PathBuf::from("/run/user/1000/hook-events/ingest.sock"), PathBuf::from(SYSTEM_SOCKET)]
        );
        assert_eq!(default_sockets(Some("relative")), [PathBuf::from(SYSTEM_SOCKET)]);
        assert_eq!(default_sockets(None), [PathBuf::from(SYSTEM_SOCKET)]);
    }
}
