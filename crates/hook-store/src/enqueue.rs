//! Transactional enqueue: inserting [`NewEvent`]s through the caller's own connection or
//! transaction, so an event is committed if and only if the caller's work is.
//!
//! Both statements are sent with explicit parameter types (`execute_typed`): one round trip, no
//! named prepared statement left on the connection, so they also work through a transaction-mode
//! connection pooler (PgBouncer) and cost a short-lived producer nothing to set up.
//!
//! Inserts skip an id that is already in the table (`ON CONFLICT (id) DO NOTHING`): a producer
//! that does not know whether an earlier attempt committed sends the same event again, and the
//! table still holds it once.

use hook_core::NewEvent;
use serde_json::Value;
use time::OffsetDateTime;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::error::StoreError;

/// One event. `$8` NULL means the database's `now()`, as the column default.
const ENQUEUE: &str = "INSERT INTO hook_events \
         (id, source, action, resource, resource_id, payload, metadata, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE($8, now())) \
     ON CONFLICT (id) DO NOTHING";

/// Many events in one statement, so the insert trigger sends one NOTIFY for all of them.
const ENQUEUE_MANY: &str = "INSERT INTO hook_events \
         (id, source, action, resource, resource_id, payload, metadata, created_at) \
     SELECT id, source, action, resource, resource_id, payload, metadata, COALESCE(created_at, now()) \
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[], \
                 $8::timestamptz[]) \
          AS e(id, source, action, resource, resource_id, payload, metadata, created_at) \
     ON CONFLICT (id) DO NOTHING";

/// A connection or transaction that [`enqueue`] and [`enqueue_many`] can write through,
/// however the caller holds it.
///
/// Implemented for tokio-postgres's `Client` and `Transaction` and for deadpool-postgres's pooled
/// `Object` (also `ClientWrapper`) and `Transaction`, so a caller passes what it has: `&client`,
/// `&transaction`, `&pooled`. Neither crate's own `GenericClient` covers all four: deadpool's is
/// implemented only for deadpool's types, tokio-postgres's only for tokio-postgres's. For another
/// pool, implement this trait by returning the tokio-postgres client its connection derefs to.
pub trait AsGenericClient: Sync {
    /// The tokio-postgres client or transaction underneath.
    type Client: GenericClient + Sync;

    /// Borrows it.
    fn generic_client(&self) -> &Self::Client;
}

impl AsGenericClient for tokio_postgres::Client {
    type Client = Self;

    fn generic_client(&self) -> &Self {
        self
    }
}

impl AsGenericClient for tokio_postgres::Transaction<'_> {
    type Client = Self;

    fn generic_client(&self) -> &Self {
        self
    }
}

impl AsGenericClient for deadpool_postgres::ClientWrapper {
    type Client = tokio_postgres::Client;

    fn generic_client(&self) -> &tokio_postgres::Client {
        self
    }
}

impl AsGenericClient for deadpool_postgres::Object {
    type Client = tokio_postgres::Client;

    fn generic_client(&self) -> &tokio_postgres::Client {
        self
    }
}

impl<'a> AsGenericClient for deadpool_postgres::Transaction<'a> {
    type Client = tokio_postgres::Transaction<'a>;

    fn generic_client(&self) -> &tokio_postgres::Transaction<'a> {
        self
    }
}

/// Inserts `event` through `client`, inside the caller's transaction if `client` is one.
///
/// Returns `true` when the event was inserted and `false` when an event with its id was already
/// in the table (nothing is changed then). Processors see the event, and are woken by its
/// NOTIFY, only when the caller's transaction commits; a rollback leaves no trace.
///
/// ```no_run
/// use hook_core::NewEvent;
/// use serde_json::json;
///
/// # async fn place_order(pool: &hook_store::deadpool_postgres::Pool) -> Result<(), Box<dyn std::error::Error>> {
/// let mut conn = pool.get().await?;
/// let tx = conn.transaction().await?;
/// tx.execute("INSERT INTO orders (id, item) VALUES ('o-1042', 'tea')", &[]).await?;
/// let event = NewEvent::new("OrderService", "order_placed", "order", "o-1042")
///     .with_payload(json!({"item": "tea"}));
/// hook_store::enqueue(&tx, &event).await?;
/// tx.commit().await?; // the order and its event, or neither
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`StoreError::Db`] when the statement fails: the connection is gone, `hook_events` does not
/// exist, a text column exceeds its 255 characters, or a JSON string holds `\u0000` (which
/// PostgreSQL's `jsonb` refuses). Inside a transaction, the transaction is then aborted.
pub async fn enqueue(client: &impl AsGenericClient, event: &NewEvent) -> Result<bool, StoreError> {
    let params: [(&(dyn ToSql + Sync), Type); 8] = [
        (&event.id, Type::UUID),
        (&event.source, Type::TEXT),
        (&event.action, Type::TEXT),
        (&event.resource, Type::TEXT),
        (&event.resource_id, Type::TEXT),
        (&event.payload, Type::JSONB),
        (&event.metadata, Type::JSONB),
        (&event.created_at, Type::TIMESTAMPTZ),
    ];
    let inserted = client.generic_client().execute_typed(ENQUEUE, &params).await?;
    Ok(inserted == 1)
}

/// Inserts `events` through `client` in one statement, in slice order, inside the caller's
/// transaction if `client` is one.
///
/// Returns how many were inserted; events whose id was already in the table (or repeated in
/// `events`) are skipped. An empty slice sends nothing. One statement means one round trip and
/// one NOTIFY however many events there are. Events without `created_at` all get the same
/// `now()`, the transaction's start; set `created_at` when the processor should see their order.
///
/// # Errors
/// As [`enqueue`]; a failing event fails the whole statement, and none is inserted.
pub async fn enqueue_many(client: &impl AsGenericClient, events: &[NewEvent]) -> Result<u64, StoreError> {
    if events.is_empty() {
        return Ok(0);
    }
    let columns = Columns::new(events);
    let params: [(&(dyn ToSql + Sync), Type); 8] = [
        (&columns.ids, Type::UUID_ARRAY),
        (&columns.sources, Type::TEXT_ARRAY),
        (&columns.actions, Type::TEXT_ARRAY),
        (&columns.resources, Type::TEXT_ARRAY),
        (&columns.resource_ids, Type::TEXT_ARRAY),
        (&columns.payloads, Type::JSONB_ARRAY),
        (&columns.metadata, Type::JSONB_ARRAY),
        (&columns.created_at, Type::TIMESTAMPTZ_ARRAY),
    ];
    Ok(client.generic_client().execute_typed(ENQUEUE_MANY, &params).await?)
}

/// The events of a batch, column by column, as `unnest` takes them.
struct Columns<'a> {
    ids: Vec<Uuid>,
    sources: Vec<&'a str>,
    actions: Vec<&'a str>,
    resources: Vec<&'a str>,
    resource_ids: Vec<&'a str>,
    payloads: Vec<&'a Value>,
    metadata: Vec<&'a Value>,
    created_at: Vec<Option<OffsetDateTime>>,
}

impl<'a> Columns<'a> {
    fn new(events: &'a [NewEvent]) -> Self {
        Self {
            ids: events.iter().map(|e| e.id).collect(),
            sources: events.iter().map(|e| e.source.as_str()).collect(),
            actions: events.iter().map(|e| e.action.as_str()).collect(),
            resources: events.iter().map(|e| e.resource.as_str()).collect(),
            resource_ids: events.iter().map(|e| e.resource_id.as_str()).collect(),
            payloads: events.iter().map(|e| &e.payload).collect(),
            metadata: events.iter().map(|e| &e.metadata).collect(),
            created_at: events.iter().map(|e| e.created_at).collect(),
        }
    }
}
