//! # hook-ingest
//!
//! A Claude Code command hook: it reads the hook's JSON from stdin and stores it as one row of
//! `hook_events`, for `hook-processor` to handle. It runs on every tool call of the agent, so it
//! is built to be quick and to never be in the way:
//!
//! - it always exits 0 and never writes to stdout (Claude Code reads a hook's stdout); a problem
//!   is one line on stderr;
//! - when a `hook-processor` serves the ingest socket ([`wire`]), the event goes through it
//!   ([`socket`]): one local round trip, inserted with whatever other hooks sent at the same
//!   moment on a connection the processor keeps open ([`server`]), answered after the commit;
//! - otherwise (or when the socket does not answer `stored` within its share of the budget)
//!   connecting, flushing and inserting share one time budget (`HOOK_INGEST_TIMEOUT`, 200 ms);
//!   when the database is away or slow, the event goes to the [spool] and the next run that
//!   reaches the database (or the socket) inserts the spooled events first, in order;
//! - every event's id is assigned before anything is sent, so an insert whose fate is unknown
//!   (cut off by the deadline, or committed by a processor that died before answering) and its
//!   copy sent another way are still stored once.
//!
//! [`mapping`] says how a hook's input becomes an event; [`settings`] which variables are read;
//! `docs/ingest.md` has the whole story. The binary is [`run`] plus printing its warning.

#![deny(missing_docs)]

pub mod deliver;
pub mod mapping;
pub mod server;
pub mod settings;
pub mod socket;
pub mod spool;
pub mod wire;

use std::io::Read;

use time::OffsetDateTime;

use crate::deliver::Delivered;
use crate::settings::Settings;

/// Reads the hook's input from `stdin`, stores it, and returns the warning to print (one line),
/// if anything went wrong. Never fails: whatever happens, the hook exits 0.
pub fn run(settings: &Settings, stdin: impl Read) -> Option<String> {
    let logged_at = OffsetDateTime::now_utc();
    let prepared = mapping::read_input(stdin, logged_at);
    let mut warnings = settings.warnings.clone();
    warnings.extend(prepared.warning);
    if let Some(event) = prepared.event {
        match deliver::deliver(settings, &event, logged_at) {
            Delivered::Inserted => {}
            Delivered::Spooled(why) | Delivered::Lost(why) => warnings.push(why),
        }
    }
    (!warnings.is_empty()).then(|| warnings.join("; ").replace(['\n', '\r'], " "))
}
