//! Delivering one event: through a running processor's socket if one answers ([`crate::socket`]);
//! else connect, flush the spool, insert; whatever does not get in within the time budget goes to
//! the spool.
//!
//! One tokio-postgres connection on a current-thread runtime, no pool, no migrations: the table
//! is assumed to exist (`hook-processor` creates it), and if it does not, the insert fails and the
//! event is spooled like in any outage. Every statement runs under the one deadline; a statement
//! cut off by it may still commit on the server, which is harmless because the event's id was
//! assigned before and the spooled copy is skipped when it is flushed.

use std::future::Future;
use std::time::{Duration, Instant};

use hook_core::NewEvent;
use hook_store::tokio_postgres::{Client, Config};
use hook_store::{enqueue, enqueue_many, redacted, EmbeddedCluster, PasswordSource, StoreError};
use serde_json::json;
use time::OffsetDateTime;

use crate::mapping::{sanitized, INGEST_SOURCE};
use crate::settings::{Database, Settings, EMBEDDED_DATABASE};
use crate::socket;
use crate::spool::Spool;

/// How one delivery talks to the database.
#[derive(Debug, Clone, Copy)]
struct Session {
    /// When everything must be done.
    deadline: Instant,
    /// The budget the deadline came from, for messages.
    budget: Duration,
    /// `synchronous_commit` for each statement's transaction, if not the server's.
    synchronous_commit: Option<&'static str>,
}

/// Spooled events inserted per statement (or sent per socket request), at most.
pub(crate) const CHUNK_EVENTS: usize = 500;

/// Bytes of spooled lines inserted per statement, about (at least one line).
const CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Bytes of spooled lines sent per socket request, about (at least one line): small enough that a
/// chunk plus one more line of the largest kind stays under [`crate::wire::MAX_REQUEST`].
pub(crate) const SOCKET_CHUNK_BYTES: usize = 1024 * 1024;

/// What happened to the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Inserted (or found already there).
    Inserted,
    /// Written to the spool; the text says why.
    Spooled(String),
    /// Neither: the spool could not be written either. The text says why.
    Lost(String),
}

/// Delivers `event`: inserts it (after flushing the spool) within `settings.timeout`, else spools
/// it with `created_at = logged_at`, so that it keeps its place among events when flushed.
///
/// When a processor listens on one of `settings.sockets`, the event (and the spool's, first)
/// goes through it, within a short part of the budget ([`socket::socket_deadline`]); only when
/// that does not end in `stored` are the database and then the spool tried, as described here.
pub fn deliver(settings: &Settings, event: &NewEvent, logged_at: OffsetDateTime) -> Delivered {
    let started = Instant::now();
    let deadline = started + settings.timeout;
    let spool = Spool::new(&settings.spool);
    let database_next = !matches!(settings.database, Database::Unusable(_));
    let socket_failure = match settings.sockets.as_slice() {
        [] => None,
        sockets => {
            let until = socket::socket_deadline(started, settings.timeout, database_next);
            match socket::deliver(sockets, &spool, event, until) {
                socket::Outcome::Stored => return Delivered::Inserted,
                socket::Outcome::NoProcessor => None,
                socket::Outcome::Failed(why) => Some(why),
            }
        }
    };
    let delivered = deliver_directly(settings, &spool, event, logged_at, deadline);
    match (delivered, socket_failure) {
        (Delivered::Spooled(why), Some(first)) => Delivered::Spooled(format!("{first}; {why}")),
        (Delivered::Lost(why), Some(first)) => Delivered::Lost(format!("{first}; {why}")),
        (delivered, _) => delivered,
    }
}

/// The database, then the spool.
fn deliver_directly(
    settings: &Settings,
    spool: &Spool,
    event: &NewEvent,
    logged_at: OffsetDateTime,
    deadline: Instant,
) -> Delivered {
    let spooled = event.clone().with_created_at(logged_at);
    let config = match &settings.database {
        Database::Configured(config, password) => Ok((Config::clone(config), password.clone())),
        Database::Embedded(dir) => EmbeddedCluster::running_config(dir, EMBEDDED_DATABASE)
            .map(|config| (config, PasswordSource::None))
            .ok_or_else(|| format!("the embedded PostgreSQL under {} is not running", dir.display())),
        Database::Unusable(why) => Err(why.clone()),
    };
    let outcome = config.and_then(|(config, password)| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting the async runtime: {e}"))?;
        let session =
            Session { deadline, budget: settings.timeout, synchronous_commit: settings.synchronous_commit };
        let outcome = runtime.block_on(insert(&config, &password, spool, event, &spooled, &session));
        // Don't wait for anything left behind (a DNS lookup, the connection's close).
        runtime.shutdown_background();
        outcome
    });
    match outcome {
        Ok(delivered) => delivered,
        Err(why) => match spool.append(&spooled) {
            Ok(_) => Delivered::Spooled(format!("{why}; event spooled to {}", spool.path().display())),
            Err(error) => Delivered::Lost(format!(
                "{why}; event lost: writing the spool {}: {error}",
                spool.path().display()
            )),
        },
    }
}

/// Connects, flushes the spool if it holds anything (unless another hook is flushing it right
/// now), and inserts `event`. `Err` means the event is not stored anywhere yet.
async fn insert(
    config: &Config,
    password: &PasswordSource,
    spool: &Spool,
    event: &NewEvent,
    spooled: &NewEvent,
    session: &Session,
) -> Result<Delivered, String> {
    let deadline = session.deadline;
    let shown = match password {
        PasswordSource::None => redacted(config),
        source => format!("{} ({source})", redacted(config)),
    };
    let budget = ms(session.budget);
    // libpq's PGSSLROOTCERT names extra trusted roots for sslmode=require (hook_store::tls).
    let root_cert = std::env::var_os("PGSSLROOTCERT").filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    let tls = hook_store::tls::make_tls(config, root_cert.as_deref()).map_err(|e| e.to_string())?;
    let connected = tokio::time::timeout_at(deadline.into(), config.connect(tls))
        .await
        .map_err(|_| format!("no connection to {shown} within {budget}"))?
        .map_err(|e| format!("connecting to {shown}: {}", StoreError::from(e)))?;
    let (client, connection) = connected;
    tokio::spawn(connection);
    let writer = Writer { client: &client, synchronous_commit: session.synchronous_commit };
    flush_and_insert(&writer, spool, event, spooled, deadline).await
}

/// Flushes the spool if it holds anything (what another hook is flushing right now is left to
/// it), then inserts `event`. When the flush stops early, `event` is spooled behind the rest.
async fn flush_and_insert(
    writer: &Writer<'_>,
    spool: &Spool,
    event: &NewEvent,
    spooled: &NewEvent,
    deadline: Instant,
) -> Result<Delivered, String> {
    if !spool.is_empty() {
        let flushed = spool
            .flush(CHUNK_EVENTS, CHUNK_BYTES, |events| async move {
                within(deadline, writer.store(&events)).await
            })
            .await
            .map_err(|error| format!("reading the spool {}: {error}", spool.path().display()))?;
        if let Some(failure) = flushed.failure {
            // Spooled events keep their created_at, so the processor still sees them first.
            return match spool.append(spooled) {
                Ok(_) => Ok(Delivered::Spooled(format!("{failure}; event spooled behind the rest"))),
                Err(error) => Err(format!("{failure}; appending to the spool: {error}")),
            };
        }
    }
    within(deadline, writer.store(std::slice::from_ref(event))).await?;
    Ok(Delivered::Inserted)
}

/// Writes events through one connection, each statement committed on its own. Also the
/// ingest socket's server ([`crate::server`]) writes through it, so a refused event becomes the
/// same raw record on every path.
pub(crate) struct Writer<'a> {
    pub(crate) client: &'a Client,
    /// `synchronous_commit` for each statement's transaction, if not the server's.
    pub(crate) synchronous_commit: Option<&'static str>,
}

impl Writer<'_> {
    /// Inserts `events` in one statement. If the database refuses the data itself (a value it
    /// cannot take, say, rather than being away), inserts them one by one and stores each refused
    /// event as a raw record with its id, so that one bad event can never block the spool.
    pub(crate) async fn store(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        let error = match self.committed(enqueue_many(self.client, events)).await {
            Ok(_) => return Ok(()),
            Err(error) => error,
        };
        // The server refused the insert: if the table itself does not fit (a NOT NULL column of
        // the user's own without a default, a column of another type), every insert will fail
        // alike, and the schema check's message names the column (the server's DETAIL would
        // quote the row, payload and all). The event then waits in the spool.
        if matches!(&error, StoreError::Db(e) if e.as_db_error().is_some()) {
            hook_store::schema::check(self.client, hook_store::schema::Scope::PRODUCER).await?;
        }
        if !refuses_data(&error) {
            return Err(error);
        }
        for event in events {
            match self.committed(enqueue(self.client, event)).await {
                Err(error) if refuses_data(&error) => {
                    self.committed(enqueue(self.client, &refused(event, &error))).await?;
                }
                other => {
                    other?;
                }
            }
        }
        Ok(())
    }

    /// Runs one statement in its own transaction. With the server's `synchronous_commit`, that
    /// is the statement alone (autocommit). Otherwise it is `BEGIN; SET LOCAL
    /// synchronous_commit`, the statement and `COMMIT`, pipelined into one round trip (requests
    /// go out in the order they are first polled). `SET LOCAL` ends with the transaction, so
    /// nothing leaks to the next user of a pooled server connection.
    async fn committed<T>(
        &self,
        statement: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let Some(value) = self.synchronous_commit else {
            return statement.await;
        };
        let begin = format!("BEGIN; SET LOCAL synchronous_commit = {value}");
        let (begun, result, committed) =
            tokio::join!(self.client.batch_execute(&begin), statement, self.client.batch_execute("COMMIT"));
        begun?;
        // After a failed statement, COMMIT only ends the aborted transaction: report the statement.
        let result = result?;
        committed?;
        Ok(result)
    }
}

/// Whether the statement failed on the data it was given: SQLSTATE classes 22 (data exception),
/// 23 (integrity constraint violation) and 54 (program limit exceeded).
fn refuses_data(error: &StoreError) -> bool {
    let StoreError::Db(error) = error else { return false };
    error.code().is_some_and(|code| ["22", "23", "54"].iter().any(|class| code.code().starts_with(class)))
}

/// The raw record standing in for an event the database refused.
fn refused(event: &NewEvent, error: &StoreError) -> NewEvent {
    let raw = serde_json::to_string(event).unwrap_or_default();
    NewEvent::new(INGEST_SOURCE, "rejected_event", "hook_event", "unknown")
        .with_id(event.id)
        .with_payload(sanitized(json!({"raw": raw, "error": chain(error)})))
        .with_metadata(event.metadata.clone())
}

/// Runs `work` until `deadline`.
async fn within<T>(
    deadline: Instant,
    work: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, String> {
    match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(result) => result.map_err(|e| chain(&e)),
        Err(_) => Err("the database did not answer in time".into()),
    }
}

/// The error and its causes, `: `-separated (tokio-postgres keeps the OS error in the source).
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = cause.source();
    }
    text
}

fn ms(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}
