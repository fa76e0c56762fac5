//! The processor's hot queries. Every SQL text of the claim path lives here.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use hook_core::{ClaimRequest, HookEvent, Outcome, Resolution, SessionOrder};
use serde_json::Value;
use time::OffsetDateTime;
use tokio_postgres::Row;
use tracing::warn;
use uuid::Uuid;

use crate::error::StoreError;

/// The columns of a [`HookEvent`], in the order [`event_from_row`] reads them.
macro_rules! event_columns {
    () => {
        "id, source, action, resource, resource_id, payload, metadata, \
         processed, processing_errors, retry_count, created_at, processed_at"
    };
}
#[cfg_attr(not(feature = "bench"), allow(unused_imports))]
pub(crate) use event_columns;

/// SQL: whether the claim transaction `$holder` (an `xid8`) is still in progress, judged by the
/// statement's snapshot: not visible to it (listed among its running transactions, or at or past
/// its `xmax`, which running transactions may be too). No commit log is read, so an xid too old
/// to look up cannot make the statement fail. (A row restored from another cluster, with an xid
/// this one has not reached, looks live and is harmless: live rows keep no event from a claim.)
macro_rules! holder_live {
    ($holder:literal) => {
        concat!(
            "(",
            $holder,
            " IS NOT NULL AND NOT pg_visible_in_snapshot(",
            $holder,
            ", pg_current_snapshot()))"
        )
    };
}

/// SQL: whether a processor that claims (a row of `hook_events_processors`, migration 0012) is
/// gone: the session advisory lock on its key, which its presence connection holds for as long as
/// it runs, is free. Tried as a shared session lock and released at once (`CASE` fixes the
/// order), so a claim that asks holds nothing afterwards; a processor's exclusive lock makes the
/// try fail. One lock-table probe per processor, no row of any batch read.
macro_rules! processor_gone {
    () => {
        "EXISTS (SELECT 1 FROM hook_events_processors AS p \
                 WHERE CASE WHEN pg_try_advisory_lock_shared(p.key) THEN pg_advisory_unlock_shared(p.key) ELSE FALSE END)"
    };
}

/// SQL: the bytes of JSON of a row's payload and metadata, as estimated before fetching them.
/// Values stored uncompressed in 2 kB or less are counted at their stored size (no work); others
/// (compressed, or larger) are measured as the JSON text the server will send, which detoasts
/// them on the server, not here.
macro_rules! json_bytes {
    ($e:literal) => {
        concat!(
            "(CASE WHEN pg_column_compression(", $e, ".payload) IS NULL AND pg_column_compression(", $e,
            ".metadata) IS NULL AND pg_column_size(", $e, ".payload) + pg_column_size(", $e,
            ".metadata) <= 2048 THEN pg_column_size(", $e, ".payload) + pg_column_size(", $e,
            ".metadata) ELSE octet_length(", $e, ".payload::text) + octet_length(", $e,
            ".metadata::text) END)::int8"
        )
    };
}

/// SQL: the event, looked up by its id, is claimable now (pending, and due if it waits for a
/// retry), stated so that it implies the predicate of no partial index: `processed IS NOT TRUE`
/// (the column is `NOT NULL`: the same rows as `NOT processed`), which the planner does not take
/// as proof of `NOT processed`. With `NOT processed` in a statement, the partial indexes of
/// pending rows (`idx_hook_events_processed`, `hook_events_claim_idx`, ...) become candidates for
/// the lookup, and when the statistics say that few rows are pending (any drained table) the
/// planner may read one of them whole instead of probing the primary key. Under a held snapshot
/// such an index keeps an entry for every event processed since, and the lookup of one event
/// reads them all: 15,000 buffers and 82 ms for a one-row completion with 250,000 events
/// processed under the snapshot (the collapse of the horizon phase from minute 7,
/// docs/benchmarks.md), against 4 buffers through the key.
macro_rules! due_by_id {
    ($e:literal) => {
        concat!(
            $e,
            ".processed IS NOT TRUE AND ",
            $e,
            ".dead_at IS NULL AND (",
            $e,
            ".next_attempt_at IS NULL OR ",
            $e,
            ".next_attempt_at <= now())"
        )
    };
}

/// SQL: the event looked up by its id is pending (neither processed nor dead), stated as
/// [`due_by_id!`] explains.
macro_rules! pending_by_id {
    ($e:literal) => {
        concat!($e, ".processed IS NOT TRUE AND ", $e, ".dead_at IS NULL")
    };
}

/// SQL: the event is not a suspect (named by a ledger row whose holder is gone: suspects are
/// retried one at a time, by [`claim_suspect`]).
macro_rules! not_suspect {
    ($e:literal) => {
        concat!(
            $e,
            ".id NOT IN (SELECT unnest(c.event_ids) FROM hook_events_claims AS c WHERE NOT ",
            holder_live!("c.holder"),
            ")"
        )
    };
}

/// SQL: the event was never tried, or is to be tried again at once, and is alive: the rows of
/// `hook_events_fresh_idx` (migration 0011).
macro_rules! fresh {
    ($e:literal) => {
        concat!("NOT ", $e, ".processed AND ", $e, ".dead_at IS NULL AND ", $e, ".next_attempt_at IS NULL")
    };
}

/// SQL: the event waits for a retry and is alive: the rows of `hook_events_due_idx`.
macro_rules! waiting {
    ($e:literal) => {
        concat!(
            "NOT ",
            $e,
            ".processed AND ",
            $e,
            ".dead_at IS NULL AND ",
            $e,
            ".next_attempt_at IS NOT NULL"
        )
    };
}

/// The columns every branch of [`CLAIM`] selects: the event's, its bytes, and whether it came
/// from the fresh index (its `created_at` moves the low-water mark).
macro_rules! claim_columns {
    () => {
        concat!(event_columns!(), ", ", json_bytes!("e"), " AS bytes")
    };
}

/// Locks up to `$1` live events that are due, skipping rows another claim holds and every event
/// named by a ledger row without a processor (read once per claim, through
/// `hook_events_claims_named_idx`: a few rows): suspects (retried one at a time, by
/// [`claim_suspect`]), quarantined events, and a batch whose outcomes are being written one at a
/// time, whose locks are dropped for a moment (see [`write_one_by_one`]). The rows of ordinary
/// batches, one per batch in flight, are read only when a processor has died (see
/// [`processor_gone`]): until the recovery turns them into suspects, their events must stay out of
/// ordinary claims. While every processor lives, their events are locked by their claims, and no
/// claim reads them, however many dead versions a held snapshot keeps. The locks last until the
/// claiming transaction ends; that transaction is the claim. They are taken in the savepoint
/// [`CLAIM_SAVEPOINT`].
///
/// Two index range scans, so that no claim walks rows it cannot take (see ARCHITECTURE.md, "What
/// a claim reads"): first the retries that are due, longest overdue first, on
/// `hook_events_due_idx` (`next_attempt_at <= now()`: the scan stops at the first retry that is
/// not due, however many wait behind it); then, for what is left of `$1`, events never tried,
/// oldest first, on `hook_events_fresh_idx` from `$4` (the store's low-water mark; NULL: from the
/// beginning). `UNION ALL` under one `LIMIT` runs its branches in order and only as far as the
/// limit needs, and `FOR UPDATE` locks a row only when it is fetched, so the claim locks no row
/// it does not return.
///
/// Then bounds the bytes: a row is returned whole while the running sum of the JSON bytes of the
/// rows before it (oldest `created_at` first) and its own stays within `$2`; a row whose bytes
/// alone exceed `$3` is returned without payload and metadata (never fetched) to be set aside
/// dead; the rest are returned without payload and metadata and are held back (locked until the
/// batch ends, untouched). The columns: the event's (payload and metadata NULL unless it fits),
/// then its bytes, whether it fits, and whether it came from the fresh branch.
///
/// Rows whose `retry_count` is already at the limit are claimed too, and set aside as dead by
/// [`claim_events`]: left out here they would never be decided, and would lie at the head of
/// the claim's index for every claim to step over.
pub(crate) const CLAIM: &str = concat!(
    "WITH named AS ( \
         SELECT unnest(c.event_ids) AS id FROM hook_events_claims AS c WHERE c.processor IS NULL \
         UNION ALL \
         SELECT unnest(c.event_ids) FROM hook_events_claims AS c \
         WHERE c.processor IS NOT NULL AND (SELECT ",
    processor_gone!(),
    ") \
     ), due AS ( \
         SELECT ",
    claim_columns!(),
    ", FALSE AS fresh FROM hook_events AS e \
         WHERE ",
    waiting!("e"),
    " AND e.next_attempt_at <= now() AND e.id NOT IN (SELECT id FROM named) \
         ORDER BY e.next_attempt_at \
         LIMIT $1::int8 \
         FOR UPDATE OF e SKIP LOCKED \
     ), fresh AS ( \
         SELECT ",
    claim_columns!(),
    ", TRUE AS fresh FROM hook_events AS e \
         WHERE ",
    fresh!("e"),
    " AND e.created_at >= COALESCE($4::timestamptz, '-infinity') AND e.id NOT IN (SELECT id FROM named) \
         ORDER BY e.created_at \
         LIMIT $1::int8 \
         FOR UPDATE OF e SKIP LOCKED \
     ), locked AS ( \
         SELECT * FROM due UNION ALL SELECT * FROM fresh LIMIT $1::int8 \
     ), sized AS ( \
         SELECT *, bytes <= $3::int8 AND sum(CASE WHEN bytes > $3::int8 THEN 0 ELSE bytes END) \
                   OVER (ORDER BY created_at ROWS UNBOUNDED PRECEDING) <= $2::int8 AS fits \
         FROM locked \
     ) \
     SELECT id, source, action, resource, resource_id, \
            CASE WHEN fits THEN payload END, CASE WHEN fits THEN metadata END, \
            processed, processing_errors, retry_count, created_at, processed_at, bytes, fits, fresh \
     FROM sized ORDER BY created_at"
);

/// SQL: an event's session, for session order: `metadata.session_id`, else `payload.session_id`,
/// cut to 128 characters; the key of `hook_events_order_idx` and of the console's
/// `hook_events_session_idx` ([`crate::indexes`]).
macro_rules! session_key {
    ($e:literal) => {
        concat!("left(coalesce(", $e, ".metadata->>'session_id', ", $e, ".payload->>'session_id'), 128)")
    };
}

/// SQL: takes the lock of the session `$key` (a SQL expression of the session's key), if it is
/// free: a transaction-level advisory lock on `(1751872367, hashtext(session) & 1023)` (the
/// class is "hkso" in ASCII; two-key advisory locks are a space apart from the one-key locks of
/// presence, migrations, archive and vacuum). The claim that attempts a session's event holds it until the batch ends,
/// so no other claim attempts an event of that session meanwhile, not even one committed late
/// with an older `created_at`, which the order index alone would show as the head.
///
/// The sessions are hashed into 1,024 locks, not one lock each: advisory locks take entries of
/// the server's shared lock table (`max_locks_per_transaction` x connections, about 6,400 on a
/// default server, which every other lock of the server needs too), and one per session in
/// flight would fill it with a few busy processors (seen in review: two claims of 10,000 heads,
/// "out of shared memory" for the second). So at most 1,024 such locks exist at once, whatever
/// the processors, batches and sessions. Sessions that share a lock wait for each other (a
/// claim passes over a head whose lock another claim holds); they are never run out of order.
///
/// The claims ask for it only of a row they have locked (`FOR UPDATE SKIP LOCKED`, in a subquery
/// below the test): asked for in the scan's filter, before the row lock, it is taken also for a
/// head that the row lock then drops (another claim holds it, or committed it since the
/// statement's snapshot, which `FOR UPDATE` rechecks), and held, for nothing, until the batch
/// ends, keeping every other claim off the session's next event meanwhile. The subquery has an
/// `OFFSET 0`: without it the planner pushes the test down into the scan's filter, below the
/// row lock, and orders it before the costlier tests of the route (seen: a lock asked for of
/// each of 200,000 heads of an unordered route, and "out of shared memory").
macro_rules! lock_session {
    ($key:literal) => {
        concat!("pg_try_advisory_xact_lock(1751872367, hashtext(", $key, ") & 1023)")
    };
}

/// SQL: whether the event's route is ordered, by the rules in the parameters `$s` (sources),
/// `$a` (actions) and `$o` (ordered), one element per rule (see [`OrderRules`]): the most
/// specific rule that matches decides (exact, then `(source, *)`, then `(*, *)`), as in the
/// handler registry; no rule, not ordered.
macro_rules! ordered_route {
    ($e:literal, $s:literal, $a:literal, $o:literal) => {
        concat!(
            "COALESCE((SELECT bool_or(r.o) FROM unnest(",
            $s,
            "::text[], ",
            $a,
            "::text[], ",
            $o,
            "::bool[]) AS r(s, a, o) WHERE r.s = ",
            $e,
            ".source AND r.a = ",
            $e,
            ".action), \
             (SELECT bool_or(r.o) FROM unnest(",
            $s,
            "::text[], ",
            $a,
            "::text[], ",
            $o,
            "::bool[]) AS r(s, a, o) WHERE r.s = ",
            $e,
            ".source AND r.a = '*'), \
             (SELECT bool_or(r.o) FROM unnest(",
            $s,
            "::text[], ",
            $a,
            "::text[], ",
            $o,
            "::bool[]) AS r(s, a, o) WHERE r.s = '*' AND r.a = '*'), FALSE)"
        )
    };
}

/// SQL: the event is held to its session's order: its route is ordered and it has a session.
/// Such events are claimed only as their session's head (see [`CLAIM_ORDERED`]).
macro_rules! in_order {
    ($e:literal, $s:literal, $a:literal, $o:literal) => {
        concat!("(", ordered_route!($e, $s, $a, $o), " AND ", session_key!($e), " IS NOT NULL)")
    };
}

/// SQL: the pending rows of `hook_events_order_idx` ([`crate::indexes::SESSION_ORDER`]), in its order, from after
/// the session `$after` (a SQL expression; none: from the first session): the first is the
/// head of the next session, its oldest event neither processed nor dead.
macro_rules! next_head {
    ($after:literal) => {
        concat!(
            "SELECT ",
            session_key!("o"),
            " AS session, o.created_at AS at, o.id AS head FROM hook_events AS o \
             WHERE NOT o.processed AND o.dead_at IS NULL AND ",
            session_key!("o"),
            " IS NOT NULL",
            $after,
            " ORDER BY ",
            session_key!("o"),
            ", o.created_at, o.id LIMIT 1"
        )
    };
}

/// [`CLAIM`] when some routes are ordered (`$5`, `$6`, `$7`: the rules, see [`OrderRules`]).
/// Events of ordered routes that have a session are left out of the two branches of [`CLAIM`]
/// and claimed by a third, between them: each session's head (its oldest event, by
/// `(created_at, id)`, that is neither processed nor dead), if that head is of an ordered
/// route, due, not named by the ledger and not locked by another claim. So an ordered event is
/// attempted only when every earlier event of its session is processed or dead: one at a time
/// across all processors (a head another claim holds is still pending, and its successors are
/// not heads), at most one per session in a claim, and a failed event (waiting for its retry,
/// or a suspect) holds its session's later events back until it succeeds or dies.
///
/// The heads are found by a loose index scan of `hook_events_order_idx` (a recursive CTE that
/// steps from one session to the next, one index probe per session with pending events), so a
/// claim costs the number of sessions with pending events, whatever their backlog; the heads
/// are claimed oldest first, each looked up by its id (a lateral subquery, which also locks it:
/// a join would let the planner read every pending row to hash them). The rows it returns
/// carry one more column, whether they came from
/// the heads (their commit sends `NOTIFY hook_events`: it may make the next event of their
/// session claimable, for any processor).
pub(crate) const CLAIM_ORDERED: &str = concat!(
    "WITH RECURSIVE named AS ( \
         SELECT unnest(c.event_ids) AS id FROM hook_events_claims AS c WHERE c.processor IS NULL \
         UNION ALL \
         SELECT unnest(c.event_ids) FROM hook_events_claims AS c \
         WHERE c.processor IS NOT NULL AND (SELECT ",
    processor_gone!(),
    ") \
     ), heads AS ( \
         (",
    next_head!(""),
    ") \
         UNION ALL \
         SELECT n.session, n.at, n.head FROM heads AS h CROSS JOIN LATERAL (",
    next_head!(" AND left(coalesce(o.metadata->>'session_id', o.payload->>'session_id'), 128) > h.session"),
    ") AS n \
     ), due AS ( \
         SELECT ",
    claim_columns!(),
    ", FALSE AS fresh, FALSE AS ordered FROM hook_events AS e \
         WHERE ",
    waiting!("e"),
    " AND e.next_attempt_at <= now() AND e.id NOT IN (SELECT id FROM named) AND NOT ",
    in_order!("e", "$5", "$6", "$7"),
    " ORDER BY e.next_attempt_at \
         LIMIT $1::int8 \
         FOR UPDATE OF e SKIP LOCKED \
     ), ordered AS ( \
         SELECT x.* FROM (SELECT head, at FROM heads ORDER BY at) AS h CROSS JOIN LATERAL ( \
             SELECT ",
    event_columns!(),
    ", bytes, fresh, ordered FROM ( \
                 SELECT ",
    claim_columns!(),
    ", FALSE AS fresh, TRUE AS ordered, ",
    session_key!("e"),
    " AS session FROM hook_events AS e \
                 WHERE e.id = h.head AND ",
    due_by_id!("e"),
    " AND e.id NOT IN (SELECT id FROM named) AND ",
    ordered_route!("e", "$5", "$6", "$7"),
    " FOR UPDATE OF e SKIP LOCKED OFFSET 0 \
             ) AS l WHERE ",
    lock_session!("l.session"),
    " \
         ) AS x \
         LIMIT $1::int8 \
     ), fresh AS ( \
         SELECT ",
    claim_columns!(),
    ", TRUE AS fresh, FALSE AS ordered FROM hook_events AS e \
         WHERE ",
    fresh!("e"),
    " AND e.created_at >= COALESCE($4::timestamptz, '-infinity') AND e.id NOT IN (SELECT id FROM named) AND NOT ",
    in_order!("e", "$5", "$6", "$7"),
    " ORDER BY e.created_at \
         LIMIT $1::int8 \
         FOR UPDATE OF e SKIP LOCKED \
     ), locked AS ( \
         SELECT * FROM due UNION ALL SELECT * FROM ordered UNION ALL SELECT * FROM fresh LIMIT $1::int8 \
     ), sized AS ( \
         SELECT *, bytes <= $3::int8 AND sum(CASE WHEN bytes > $3::int8 THEN 0 ELSE bytes END) \
                   OVER (ORDER BY created_at ROWS UNBOUNDED PRECEDING) <= $2::int8 AS fits \
         FROM locked \
     ) \
     SELECT id, source, action, resource, resource_id, \
            CASE WHEN fits THEN payload END, CASE WHEN fits THEN metadata END, \
            processed, processing_errors, retry_count, created_at, processed_at, bytes, fits, fresh, ordered \
     FROM sized ORDER BY created_at"
);

/// The rules of session order as the parameters of `CLAIM_ORDERED` and `RESCAN_ORDERED`:
/// one element per rule in each array. Built once per store from a [`SessionOrder`]; `None`
/// when no route is ordered, and the claim is then `CLAIM`, unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderRules {
    sources: Vec<String>,
    actions: Vec<String>,
    ordered: Vec<bool>,
}

impl OrderRules {
    /// The parameters for `order`, or `None` when it orders nothing.
    pub fn new(order: &SessionOrder) -> Option<Self> {
        if !order.is_on() {
            return None;
        }
        let mut rules = OrderRules::default();
        for rule in &order.rules {
            rules.sources.push(rule.source.clone());
            rules.actions.push(rule.action.clone());
            rules.ordered.push(rule.ordered);
        }
        Some(rules)
    }
}

/// The savepoint every claim's transaction opens right after BEGIN, before it locks anything.
///
/// The claim's row locks and the outcomes' updates are then made by the same subtransaction. Were
/// the locks taken by the transaction itself and the updates made in a savepoint (which the
/// row-by-row fallback needs to return to), each updated row would need a MultiXact to record
/// both the parent's lock and the subtransaction's update: one per event, written and later read
/// back by every claim that steps over the row's dead version (measured: a third of the drain).
pub(crate) const CLAIM_SAVEPOINT: &str = "SAVEPOINT hook_claim";

/// Set around [`CLAIM`] in its transaction: the claim is planned (a prepared statement's plan,
/// cached after five runs, is made under the settings of the run that makes it) with sorts
/// penalized, so that each branch reads its own index in order and stops at its `LIMIT`. Without
/// it, when the statistics say no row waits for a retry (`next_attempt_at` all NULL), the
/// planner may serve the due branch with a full scan of another partial index
/// (`hook_events_claim_idx`, every live row) and a sort of the one row it expects: a scan
/// proportional to the backlog, in every claim. The sorts the statement cannot do without (the
/// byte budget's window and the final order, over at most `$1` rows) are still made. The
/// penalty inflates the plan's estimated cost past every JIT threshold, so JIT is off too: it
/// would compile the statement, for seconds, at every run.
///
/// Sequential scans are penalized too, so that the ledger's rows every claim reads (those without
/// a processor) are read through `hook_events_claims_named_idx` however the statistics of a
/// table of a few rows come out, and never by a scan of every batch's row and dead version.
pub(crate) const CLAIM_PLANNER: &str =
    "SET LOCAL enable_sort = off; SET LOCAL enable_seqscan = off; SET LOCAL jit = off";

/// Restores the planner's settings after [`CLAIM`] and [`CLAIM_INFO`], for the rest of the
/// claim's transaction.
const CLAIM_PLANNER_END: &str = "RESET enable_sort; RESET enable_seqscan; RESET jit";

/// Sent before a batch's outcomes ([`SUCCEED`], [`FAIL`], [`SET_ASIDE`]) in the claim's
/// transaction, whose end ends it too. Deferred constraints are checked at each statement, where
/// a refusal can be caught, not at COMMIT, where it would roll the batch back. And the outcome
/// statements are planned at each run, for the table as it is then (a few dozen microseconds per
/// batch): a prepared statement's generic plan is made once, under the statistics of that
/// moment, and kept until the next `ANALYZE` of the table. Made while the table was new or just
/// emptied (no rows, as far as the planner knows), it walks the whole table (a sequential scan,
/// or with those disabled a full scan of an index) and probes the batch's ids for each row, and
/// on a server whose autovacuum is off every completion did so for ever (seen: 120,000 rows read
/// per completion after five minutes at 500 events/s, and growing). The setting also applies to
/// what a user's trigger on `hook_events` runs during the outcomes.
pub(crate) const OUTCOME_OPEN: &str =
    "SET CONSTRAINTS ALL IMMEDIATE; SET LOCAL plan_cache_mode = force_custom_plan";

/// Opens the rescan's transaction (see [`rescan`]).
const RESCAN_BEGIN: &str = "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan";

/// SQL: the rescan below the low-water mark, with `$extra` after its own conditions: nothing, or
/// more of them as `concat!` arguments, each followed by a comma. See [`RESCAN`].
macro_rules! rescan {
    ($($extra:tt)*) => {
        concat!(
            "SELECT isfinite(e.created_at), CASE WHEN isfinite(e.created_at) THEN e.created_at END \
             FROM hook_events AS e \
             WHERE ",
            fresh!("e"),
            " AND e.created_at < $1::timestamptz \
             AND ($2::timestamptz IS NULL OR e.created_at >= $2::timestamptz) AND ",
            not_suspect!("e"),
            $($extra)*
            " ORDER BY e.created_at \
             LIMIT 1 \
             FOR KEY SHARE SKIP LOCKED"
        )
    };
}

/// The rescan below the low-water mark (see [`rescan`]): the oldest event never tried whose
/// `created_at` is before `$1` (and at or after `$2`, unless that is NULL: a recent rescan) and
/// that no claim holds (`FOR KEY SHARE SKIP LOCKED`, in a transaction that ends at once, so the
/// lock ends with it; it conflicts only with a claim's `FOR UPDATE`, so rows in flight are
/// skipped and no writer waits), and whether that `created_at` is finite (an `-infinity` cannot
/// be a mark: the claim then starts from the beginning).
pub(crate) const RESCAN: &str = rescan!();

/// [`RESCAN`] when some routes are ordered (`$3`, `$4`, `$5`: the rules, see [`OrderRules`]):
/// events held to their session's order are left out, as they are out of the fresh branch of
/// [`CLAIM_ORDERED`] (its heads are found without the mark), so that events waiting behind
/// their session's head do not pull the mark back at every rescan.
const RESCAN_ORDERED: &str = rescan!(" AND NOT ", in_order!("e", "$3", "$4", "$5"),);

/// What the claim's transaction learns right after claiming, in the same round trip: its
/// transaction id (assigned by the row locks; NULL when it locked nothing), whether suspect
/// events are waiting (a processor gone, whose batches are to be recovered; a row without a
/// processor whose holder is gone; or a queued suspect that is due), and the transaction's
/// `now()` (for the low-water mark). Reads the ledger's rows without a processor only.
const CLAIM_INFO: &str = concat!(
    "SELECT pg_current_xact_id_if_assigned()::text, \
            EXISTS (SELECT 1 FROM hook_events_claims AS c \
                    WHERE c.processor IS NULL AND c.note IS NULL AND NOT ",
    holder_live!("c.holder"),
    " AND (c.holder IS NOT NULL \
                         OR EXISTS (SELECT 1 FROM hook_events AS e WHERE e.id = ANY (c.event_ids) AND ",
    due_by_id!("e"),
    "))) OR ",
    processor_gone!(),
    ", now()"
);

/// Recovery, before an isolated claim, autocommitted. First, each ledger row of an ordinary batch
/// whose holder is gone (it crashed, lost its connection or was killed) becomes one queued row
/// per event (no holder): its events are suspects, to be handled one at a time, and are not
/// charged an attempt (which of them took the process down is not known). Second, rows that
/// name no pending event any more (processed, dead, replayed, archived) are dropped, and so are
/// clear slots unused for an hour (left by processors before migration 0012). Rows locked by
/// another claimer's recovery are skipped. Third, the processors that are gone (their lock is
/// free) and that no ledger row names any more are struck off `hook_events_processors`, so that
/// claims stop reading the batches' rows. One implicit transaction (a simple query of several
/// statements): a processor is struck off only with its batches recovered. Not "with no batch
/// live": a batch whose holder was live for the first statement and is gone by the third (its
/// claim's session outlived the presence's) keeps its row, which no claim would read once its
/// processor is struck off; the next recovery makes it suspects, then strikes the processor off.
const RECOVER: &str = concat!(
    "WITH orphans AS ( \
         DELETE FROM hook_events_claims WHERE id IN ( \
             SELECT c.id FROM hook_events_claims AS c \
             WHERE c.holder IS NOT NULL AND NOT c.isolated AND NOT ",
    holder_live!("c.holder"),
    " FOR UPDATE SKIP LOCKED) \
         RETURNING event_ids \
     ) \
     INSERT INTO hook_events_claims (id, event_ids) \
     SELECT gen_random_uuid(), ARRAY[s.id] FROM (SELECT DISTINCT unnest(event_ids) AS id FROM orphans) AS s; \
     DELETE FROM hook_events_claims WHERE id IN ( \
         SELECT c.id FROM hook_events_claims AS c \
         WHERE NOT ",
    holder_live!("c.holder"),
    " AND (cardinality(c.event_ids) > 0 OR c.created_at < now() - interval '1 hour') \
           AND NOT EXISTS (SELECT 1 FROM hook_events AS e \
                           WHERE e.id = ANY (c.event_ids) AND ",
    pending_by_id!("e"),
    ") \
         FOR UPDATE SKIP LOCKED); \
     DELETE FROM hook_events_processors AS p \
     WHERE CASE WHEN pg_try_advisory_lock(p.key) THEN pg_advisory_unlock(p.key) ELSE FALSE END \
       AND NOT EXISTS (SELECT 1 FROM hook_events_claims AS c WHERE c.processor = p.key)"
);

/// An event whose isolated attempt died with its holder: the crash was the event's. Locks the
/// ledger row and the event (skipping those another claimer holds), so the crash is counted
/// once. The event's columns (payload and metadata empty: no handler runs), then the ledger
/// row's id.
const CLAIM_CRASHED: &str = concat!(
    "SELECT e.id, e.source, e.action, e.resource, e.resource_id, '{}'::jsonb, '{}'::jsonb, \
            e.processed, e.processing_errors, e.retry_count, e.created_at, e.processed_at, c.id \
     FROM hook_events_claims AS c JOIN hook_events AS e ON e.id = c.event_ids[1] \
     WHERE c.isolated AND c.note IS NULL AND NOT ",
    holder_live!("c.holder"),
    " AND ",
    pending_by_id!("e"),
    " \
     ORDER BY c.created_at \
     LIMIT 1 \
     FOR UPDATE OF c, e SKIP LOCKED"
);

/// The oldest due queued suspect, locked, to be handled alone; the columns of [`CLAIM`], then
/// the ledger row's id. `$1` is the byte limit of one event. A suspect with a session is taken
/// only with its session's lock (see `lock_session!`), so that it does not run beside an event
/// of its session that another claim attempts: the suspects are tried oldest first, each looked
/// up by its id (a lateral subquery), and the lock is asked for only of the one being tried.
const CLAIM_SUSPECT: &str = concat!(
    "WITH s AS ( \
         SELECT x.* FROM ( \
             SELECT c.id AS claim_id, e.id, e.created_at FROM hook_events_claims AS c \
             JOIN hook_events AS e ON e.id = c.event_ids[1] \
             WHERE c.holder IS NULL AND c.note IS NULL AND ",
    due_by_id!("e"),
    " ORDER BY e.created_at \
         ) AS q CROSS JOIN LATERAL ( \
             SELECT l.* FROM ( \
                 SELECT e.id, e.source, e.action, e.resource, e.resource_id, e.payload, e.metadata, \
                        e.processed, e.processing_errors, e.retry_count, e.created_at, e.processed_at, ",
    json_bytes!("e"),
    " AS bytes, q.claim_id, ",
    session_key!("e"),
    " AS session \
                 FROM hook_events AS e \
                 WHERE e.id = q.id AND ",
    due_by_id!("e"),
    " FOR UPDATE OF e SKIP LOCKED OFFSET 0 \
             ) AS l WHERE l.session IS NULL OR ",
    lock_session!("l.session"),
    " \
         ) AS x \
         LIMIT 1 \
     ) \
     SELECT id, source, action, resource, resource_id, \
            CASE WHEN bytes <= $1::int8 THEN payload END, CASE WHEN bytes <= $1::int8 THEN metadata END, \
            processed, processing_errors, retry_count, created_at, processed_at, bytes, bytes <= $1::int8, claim_id \
     FROM s"
);

/// Records, on a connection of its own and autocommitted, the events an ordinary claim is about
/// to hand to handlers: `$1` the row's id (new for each batch), `$2` the claim's transaction id,
/// `$3` the events, `$4` the store's processor key (NULL while its presence is not registered:
/// the row is then read by every claim, as a suspect's is). The key is written only if it is
/// registered: a presence whose session ended is known to its store only at its next ping, and a
/// recovery may have struck the key off meanwhile; a row under a key no registry row holds would
/// be read by no claim, even after its process died. Only while that transaction is alive
/// (one already gone has lost its locks: its handlers must not start).
///
/// The batch's commit deletes the row. No claim reads the rows of live processors' batches (see
/// [`CLAIM`]), so the dead versions they leave, which only vacuum removes (and, under a held
/// snapshot, not even vacuum), cost the claims nothing; the row is found by its key alone.
const RECORD_CLAIM: &str = concat!(
    "INSERT INTO hook_events_claims (id, holder, event_ids, processor) \
     SELECT $1, $2::text::xid8, $3::uuid[], \
            (SELECT p.key FROM hook_events_processors AS p WHERE p.key = $4::int8) WHERE ",
    holder_live!("$2::text::xid8")
);

/// Takes over a queued suspect for an isolated claim (`$1` the ledger row, `$2` the claim's
/// transaction id), on a connection of its own, autocommitted.
const RECORD_ISOLATED: &str = concat!(
    "UPDATE hook_events_claims SET holder = $2::text::xid8, isolated = TRUE \
     WHERE id = $1 AND holder IS NULL AND ",
    holder_live!("$2::text::xid8")
);

/// Drops a ledger row (in the claim's transaction, for a suspect set aside).
const FORGET_CLAIM: &str = "DELETE FROM hook_events_claims WHERE id = $1";

/// Whether a transaction committed, for a completion whose COMMIT reply was lost.
const XACT_STATUS: &str = "SELECT pg_xact_status($1::text::xid8)::text";

/// Keeps an event whose outcome could not be written at all (not even as dead) out of every
/// claim, with the reason, until an operator deals with it (see docs/operations.md). Written in
/// the batch's transaction.
const QUARANTINE: &str =
    "INSERT INTO hook_events_claims (id, event_ids, note) VALUES (gen_random_uuid(), ARRAY[$1::uuid], $2)";

/// Makes a batch's ledger row (`$1`) one that every claim reads, before its outcome fallback drops
/// the batch's locks for a moment (see [`write_one_by_one`]).
const GUARD_CLAIM: &str = "UPDATE hook_events_claims SET processor = NULL WHERE id = $1";

/// What [`write_one_by_one`] needs to keep other claims off a batch's events while its locks are
/// dropped: a pool for a connection of its own, and the batch's ledger row.
#[derive(Clone, Copy)]
pub(crate) struct Guard<'a> {
    pub(crate) pool: &'a deadpool_postgres::Pool,
    pub(crate) ledger: Uuid,
}

/// Locks a batch's events again, the ledger rows that name them and their sessions' locks (see
/// `lock_session!`; a rollback to the savepoint released those taken by the claim), after its
/// transaction returned to the claim's savepoint. The count is of rows locked and session locks
/// taken.
const RELOCK: &str = concat!(
    "WITH e AS (SELECT 1 FROM hook_events WHERE id = ANY ($1::uuid[]) FOR UPDATE), \
          c AS (SELECT 1 FROM hook_events_claims WHERE event_ids && $1::uuid[] FOR UPDATE), \
          s AS (SELECT ",
    lock_session!("k.session"),
    " AS taken FROM (SELECT ",
    session_key!("o"),
    " AS session FROM hook_events AS o WHERE o.id = ANY ($1::uuid[])) AS k \
                WHERE k.session IS NOT NULL) \
     SELECT (SELECT count(*) FROM e) + (SELECT count(*) FROM c) + (SELECT count(*) FILTER (WHERE taken) FROM s)"
);

/// Marks claimed rows that cannot be attempted dead, recording why.
const SET_ASIDE: &str = "UPDATE hook_events AS e \
     SET dead_at = now(), next_attempt_at = NULL, \
         processing_errors = array_append(e.processing_errors, r.reason) \
     FROM unnest($1::uuid[], $2::text[]) AS r(id, reason) \
     WHERE e.id = r.id";

/// Marks events processed. `processed_at` is when the outcome is written (`clock_timestamp()`,
/// not the claim transaction's start, `now()`, which is before the handler ran), as in the
/// original, which set it in its own transaction after the handler. `GREATEST` keeps the table's
/// `processed_at >= created_at` check true when a producer's clock ran ahead of the database's.
pub(crate) const SUCCEED: &str = "UPDATE hook_events AS e \
     SET processed = TRUE, processed_at = GREATEST(clock_timestamp(), e.created_at), \
         result_metadata = r.metadata, next_attempt_at = NULL, dead_at = NULL \
     FROM unnest($1::uuid[], $2::jsonb[]) AS r(id, metadata) \
     WHERE e.id = r.id AND e.processed IS NOT TRUE";

/// Counts a failed attempt, appends its error and schedules the next attempt (or marks it dead).
/// The delay counts from when the failure is written (`clock_timestamp()`), not from the claim's
/// start (`now()`), so a retry never comes earlier than the policy says.
const FAIL: &str = "UPDATE hook_events AS e \
     SET retry_count = LEAST(e.retry_count + 1, 10), \
         processing_errors = array_append(e.processing_errors, r.error), \
         result_metadata = r.metadata, \
         next_attempt_at = CASE WHEN r.dead THEN NULL ELSE clock_timestamp() + r.delay_ms * interval '1 millisecond' END, \
         dead_at = CASE WHEN r.dead THEN clock_timestamp() END \
     FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::int8[], $5::bool[]) AS r(id, error, metadata, delay_ms, dead) \
     WHERE e.id = r.id AND e.processed IS NOT TRUE";

/// Decodes one `hook_events` row selected in the column order of [`HookEvent`]. Tolerates NULL elements in
/// `processing_errors` (a hand-written row may hold them), so no row can wedge the claim loop.
pub(crate) fn event_from_row(row: &Row) -> Result<HookEvent, StoreError> {
    let errors: Option<Vec<Option<String>>> = row.try_get(8)?;
    Ok(HookEvent {
        id: row.try_get(0)?,
        source: row.try_get(1)?,
        action: row.try_get(2)?,
        resource: row.try_get(3)?,
        resource_id: row.try_get(4)?,
        payload: row.try_get(5)?,
        metadata: row.try_get(6)?,
        processed: row.try_get(7)?,
        processing_errors: errors.map(|e| e.into_iter().flatten().collect()),
        retry_count: row.try_get(9)?,
        created_at: row.try_get(10)?,
        processed_at: row.try_get(11)?,
    })
}

/// What one claim took: the events to attempt, and the rows it set aside or held back instead.
#[derive(Debug, Default)]
pub struct Claimed {
    /// The events to hand to handlers, oldest first.
    pub events: Vec<HookEvent>,
    /// Rows the claim took but marked dead instead of returning (see [`claim_events`]). They
    /// count toward the claim's `limit`: when `events.len() + set_aside + held_back` reaches it,
    /// more rows may be waiting.
    pub set_aside: usize,
    /// Rows the claim locked but did not return, because the byte limit was reached; released
    /// unchanged when the claim ends.
    pub held_back: usize,
    /// Bytes of JSON of the events' payloads and metadata.
    pub bytes: u64,
    /// The claim's transaction id (as text), when it locked rows.
    pub xid: Option<String>,
    /// Whether suspect events are waiting for an isolated claim.
    pub suspects: bool,
    /// The low-water mark this claim leaves: where the next claim may start reading events never
    /// tried (see [`claim_events_after`]). `None`: from the beginning.
    pub floor: Option<OffsetDateTime>,
    /// Rows claimed as their session's head, in session order (see [`claim_events_ordered`]).
    pub heads: usize,
}

/// Claims up to `request.limit` eligible rows with `FOR UPDATE SKIP LOCKED`, within
/// `request.max_bytes`, reading the fresh index from its beginning. See [`claim_events_after`].
pub async fn claim_events(
    client: &impl GenericClient,
    request: &ClaimRequest,
    begin: Option<&str>,
) -> Result<Claimed, StoreError> {
    claim_events_after(client, request, begin, None).await
}

/// How far out of order by `created_at` events may commit and still be claimed by the next
/// claim: a claim's low-water mark ([`Claimed::floor`]) is never later than its transaction's
/// start less this. An event whose `created_at` is its inserting transaction's start (the
/// column's default) is late by as long as that transaction ran; events later than this are
/// found by the store's rescan ([`PgStore::rescan`](crate::PgStore::rescan)).
pub const LATE_COMMIT_MARGIN: Duration = Duration::from_secs(1);

/// Claims up to `request.limit` eligible rows with `FOR UPDATE SKIP LOCKED`, within
/// `request.max_bytes`: due retries first, then events never tried from `floor` (a low-water
/// mark: an earlier claim's [`Claimed::floor`]; `None` reads from the beginning). Must run inside
/// a transaction, which then holds the claim; `begin`, when given, is sent first in the same
/// round trip (the statements that open that transaction).
///
/// Claimed rows that cannot be attempted are set aside as dead in the same transaction, with
/// the reason appended to `processing_errors`, and not returned: rows this build cannot decode,
/// rows whose `retry_count` is already `max_retry_count` or more (inserted that way, left by
/// the original service, or by a processor with a higher limit), and rows whose payload and
/// metadata alone exceed `request.max_event_bytes` (never fetched).
pub async fn claim_events_after(
    client: &impl GenericClient,
    request: &ClaimRequest,
    begin: Option<&str>,
    floor: Option<OffsetDateTime>,
) -> Result<Claimed, StoreError> {
    claim_events_ordered(client, request, begin, floor, None).await
}

/// [`claim_events_after`], in session order when `order` is given (`CLAIM_ORDERED`: an event
/// of an ordered route is claimed only as its session's head); `None` is `CLAIM`, unchanged.
pub async fn claim_events_ordered(
    client: &impl GenericClient,
    request: &ClaimRequest,
    begin: Option<&str>,
    floor: Option<OffsetDateTime>,
    order: Option<&OrderRules>,
) -> Result<Claimed, StoreError> {
    let statement = client.prepare_cached(if order.is_some() { CLAIM_ORDERED } else { CLAIM }).await?;
    let info = client.prepare_cached(CLAIM_INFO).await?;
    let limit = i64::try_from(request.limit).unwrap_or(i64::MAX);
    let max_bytes = i64::try_from(request.max_bytes).unwrap_or(i64::MAX);
    let max_event_bytes = i64::try_from(request.max_event_bytes).unwrap_or(i64::MAX);
    let begun = async {
        match begin {
            Some(sql) => client.batch_execute(sql).await,
            None => Ok(()),
        }
    };
    // BEGIN, the claim (planned without sorts, see CLAIM_PLANNER) and what the transaction
    // learns from it: one round trip.
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        vec![&limit, &max_bytes, &max_event_bytes, &floor];
    if let Some(rules) = order {
        params.extend([
            &rules.sources as &(dyn tokio_postgres::types::ToSql + Sync),
            &rules.actions,
            &rules.ordered,
        ]);
    }
    let (begun, planner, rows, info, restored) = futures::join!(
        begun,
        client.batch_execute(CLAIM_PLANNER),
        client.query(&statement, &params),
        client.query_one(&info, &[]),
        client.batch_execute(CLAIM_PLANNER_END)
    );
    begun?;
    planner?;
    restored?;
    let rows = rows?;
    let info = info?;
    let mut claimed = decide(client, &rows, request).await?;
    claimed.xid = info.try_get(0)?;
    claimed.suspects = info.try_get(1)?;
    claimed.floor = next_floor(&rows, info.try_get(2)?)?;
    if order.is_some() {
        for row in &rows {
            if row.try_get::<_, bool>(15)? {
                claimed.heads += 1;
            }
        }
    }
    Ok(claimed)
}

/// The low-water mark after a claim that locked `rows` (the columns of [`CLAIM`]) in a
/// transaction that started at `now`: the oldest `created_at` it locked from the fresh index,
/// or `now` less [`LATE_COMMIT_MARGIN`] if that is earlier. Every event never tried that is
/// older than the mark, and committed when the claim ran, was processed, held by a claim, a
/// suspect, or invisible to the claim's snapshot (committed since); the last commit within the
/// margin, or are found by [`rescan`]. `None` (from the beginning) when a locked row's
/// `created_at` cannot be represented (`-infinity`, `infinity`).
fn next_floor(rows: &[Row], now: OffsetDateTime) -> Result<Option<OffsetDateTime>, StoreError> {
    let margin = time::Duration::try_from(LATE_COMMIT_MARGIN).unwrap_or(time::Duration::SECOND);
    let mut floor = now - margin;
    for row in rows {
        if !row.try_get::<_, bool>(14)? {
            continue;
        }
        match row.try_get::<_, OffsetDateTime>(10) {
            Ok(created_at) => floor = floor.min(created_at),
            // `-infinity` (or `infinity`): such a row is set aside by this claim; from the
            // beginning, once, to be sure nothing is left behind it.
            Err(_) => return Ok(None),
        }
    }
    Ok(Some(floor))
}

/// Looks for an event never tried, older than the low-water mark `floor` and held by no claim:
/// one that committed later than [`LATE_COMMIT_MARGIN`] after it was created, was released by a
/// claim of another process, or became claimable again (the original's reset SQL, hook-replay,
/// an operator's fix). Returns the mark the next claim must start from: `Some(created_at)` of
/// the oldest such event, `Some(None)` for the beginning (its `created_at` is `-infinity`), or
/// `None` when there is none. `from`: look only at events created at or after it (a recent
/// rescan, see `PgStore`'s `Mark`); `None`: at every event below the mark (a full rescan). In a
/// transaction of its own, off the claim's path: under a held snapshot a full rescan walks every
/// index entry below the mark that vacuum could not remove, which is what the mark spares the
/// claims; a recent one, those from `from` on.
pub(crate) async fn rescan(
    client: &impl GenericClient,
    floor: OffsetDateTime,
    from: Option<OffsetDateTime>,
    order: Option<&OrderRules>,
) -> Result<Option<Option<OffsetDateTime>>, StoreError> {
    // In a transaction of its own, planned at each run for the table as it is (see
    // OUTCOME_OPEN: a generic plan made on an empty table would scan and sort the whole table).
    // One round trip.
    let (statement, params): (_, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>) = match order {
        None => (client.prepare_cached(RESCAN).await?, vec![&floor, &from]),
        Some(rules) => (
            client.prepare_cached(RESCAN_ORDERED).await?,
            vec![&floor, &from, &rules.sources, &rules.actions, &rules.ordered],
        ),
    };
    let (begun, row, ended) = futures::join!(
        client.batch_execute(RESCAN_BEGIN),
        client.query_opt(&statement, &params),
        client.batch_execute("COMMIT")
    );
    begun?;
    ended?;
    let Some(row) = row? else {
        return Ok(None);
    };
    let finite: bool = row.try_get(0)?;
    Ok(Some(if finite { row.try_get(1)? } else { None }))
}

/// Recovers the ledger rows of dead holders (see [`RECOVER`]), autocommitted, then runs `begin`;
/// one round trip. Two Query messages: in one, the statements before BEGIN would become part of
/// the transaction BEGIN opens.
pub(crate) async fn recover_and_begin(client: &impl GenericClient, begin: &str) -> Result<(), StoreError> {
    let (recovered, begun) = futures::join!(client.batch_execute(RECOVER), client.batch_execute(begin));
    recovered?;
    begun?;
    Ok(())
}

/// A crash to count: an event whose isolated holder died, with its ledger row's id and the
/// claim's transaction id. Inside the claim's transaction.
pub(crate) async fn claim_crashed(
    client: &impl GenericClient,
) -> Result<Option<(HookEvent, Uuid, Option<String>)>, StoreError> {
    let statement = client.prepare_cached(CLAIM_CRASHED).await?;
    let info = client.prepare_cached(CLAIM_INFO).await?;
    let (rows, info) = futures::join!(client.query(&statement, &[]), client.query_one(&info, &[]));
    let (rows, info) = (rows?, info?);
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let ledger: Uuid = row.try_get(12)?;
    match event_from_row(row) {
        Ok(event) => Ok(Some((event, ledger, info.try_get(0)?))),
        Err(error) => {
            // The row could be read when it was claimed; if it cannot be now, the next ordinary
            // claim... cannot take it (it is a suspect): count nothing and drop the ledger row,
            // so that an ordinary claim sets it aside.
            let id: Uuid = row.try_get(0)?;
            warn!(event_id = %id, error = %error, "a crashed event cannot be decoded; leaving it to an ordinary claim");
            client.execute(FORGET_CLAIM, &[&ledger]).await?;
            Ok(None)
        }
    }
}

/// The oldest due suspect, to be handled alone, with its ledger row's id. Inside the claim's
/// transaction. A suspect that cannot be attempted is set aside as by [`claim_events`], and its
/// ledger row dropped in the same transaction.
pub(crate) async fn claim_suspect(
    client: &impl GenericClient,
    request: &ClaimRequest,
) -> Result<Option<(Claimed, Uuid)>, StoreError> {
    let statement = client.prepare_cached(CLAIM_SUSPECT).await?;
    let info = client.prepare_cached(CLAIM_INFO).await?;
    let max_event_bytes = i64::try_from(request.max_event_bytes).unwrap_or(i64::MAX);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&max_event_bytes];
    let (rows, info) = futures::join!(client.query(&statement, &params), client.query_one(&info, &[]));
    let (rows, info) = (rows?, info?);
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let ledger: Uuid = row.try_get(14)?;
    let mut claimed = decide(client, &rows, request).await?;
    if claimed.set_aside > 0 {
        client.execute(FORGET_CLAIM, &[&ledger]).await?;
    }
    claimed.xid = info.try_get(0)?;
    claimed.suspects = true;
    Ok(Some((claimed, ledger)))
}

/// Sorts claimed rows (the columns of [`CLAIM`]) into events, held-back rows and rows to set
/// aside, and sets the latter aside.
async fn decide(
    client: &impl GenericClient,
    rows: &[Row],
    request: &ClaimRequest,
) -> Result<Claimed, StoreError> {
    let max_retry_count = request.max_retry_count;
    let mut claimed = Claimed { events: Vec::with_capacity(rows.len()), ..Claimed::default() };
    let (mut set_aside, mut reasons) = (Vec::new(), Vec::new());
    for row in rows {
        let bytes = u64::try_from(row.try_get::<_, i64>(12)?).unwrap_or(0);
        let fits: bool = row.try_get(13)?;
        if !fits && bytes <= request.max_event_bytes {
            claimed.held_back += 1;
            continue;
        }
        let (id, reason) = if !fits {
            let id: Uuid = row.try_get(0)?;
            warn!(event_id = %id, bytes, max_bytes_in_flight = request.max_event_bytes, "claimed an event too large to hold; setting it aside as dead without fetching it");
            (
                id,
                format!(
                    "payload and metadata are {bytes} bytes of JSON, more than the processor may hold at once \
                     (its max bytes in flight, {}); set aside as dead without being fetched",
                    request.max_event_bytes
                ),
            )
        } else {
            match event_from_row(row) {
                Ok(event) if u32::try_from(event.retry_count).unwrap_or(u32::MAX) < max_retry_count => {
                    claimed.bytes += bytes;
                    claimed.events.push(event);
                    continue;
                }
                Ok(event) => (
                    event.id,
                    format!(
                        "retry_count {} is at MAX_RETRY_COUNT ({max_retry_count}) or past it before an attempt; \
                         set aside as dead",
                        event.retry_count
                    ),
                ),
                // A row this build cannot represent (jsonb nested deeper than serde_json's limit,
                // a created_at of 'infinity', ...) would otherwise stay first in line and fail
                // every claim.
                Err(error) => {
                    // A column of another type fails every row alike: stop claiming and name it,
                    // rather than set the table aside row by row (see crate::schema).
                    if let Some(mismatch) = crate::schema::type_mismatch(row, &error) {
                        return Err(mismatch);
                    }
                    let id: Uuid = row.try_get(0)?;
                    warn!(event_id = %id, error = %error, "claimed a row that cannot be decoded; setting it aside as dead");
                    (id, format!("undecodable row, set aside as dead: {error}"))
                }
            }
        };
        set_aside.push(id);
        reasons.push(hook_core::bound_text(&reason));
    }
    if !set_aside.is_empty() {
        // One line per claim, not per row: after an upgrade a claim may meet thousands of rows
        // the original left at the limit. Each row's reason is in its processing_errors.
        warn!(rows = set_aside.len(), first = %set_aside[0], reason = %reasons[0], "set aside rows that cannot be attempted");
        let statement = client.prepare_cached(SET_ASIDE).await?;
        client.execute(&statement, &[&set_aside, &reasons]).await?;
    }
    claimed.set_aside = set_aside.len();
    Ok(claimed)
}

/// Records an ordinary claim's events in the ledger, on `client` (not the claim's connection).
/// False when the claim's transaction is already gone.
pub(crate) async fn record_claim(
    client: &impl GenericClient,
    id: Uuid,
    xid: &str,
    events: &[Uuid],
    processor: Option<i64>,
) -> Result<bool, StoreError> {
    let statement = client.prepare_cached(RECORD_CLAIM).await?;
    Ok(client.execute(&statement, &[&id, &xid, &events, &processor]).await? == 1)
}

/// Takes over a queued suspect's ledger row for an isolated claim, on `client` (not the claim's
/// connection). False when the claim's transaction is already gone or the row was taken.
pub(crate) async fn record_isolated(
    client: &impl GenericClient,
    id: Uuid,
    xid: &str,
) -> Result<bool, StoreError> {
    let statement = client.prepare_cached(RECORD_ISOLATED).await?;
    Ok(client.execute(&statement, &[&id, &xid]).await? == 1)
}

/// Applies `end` to a ledger row, autocommitted.
pub(crate) async fn end_claim(client: &impl GenericClient, end: LedgerEnd) -> Result<(), StoreError> {
    if let Some(sql) = ledger_sql(end) {
        client.batch_execute(&sql).await?;
    }
    Ok(())
}

/// The statement that applies `end` to its ledger row; `None` for [`LedgerEnd::Keep`]. Ids are
/// formatted into the text (a UUID's text form is hex and dashes), so it can go in a simple query.
pub(crate) fn ledger_sql(end: LedgerEnd) -> Option<String> {
    match end {
        LedgerEnd::Keep => None,
        LedgerEnd::Forget(id) => Some(format!("DELETE FROM hook_events_claims WHERE id = '{id}'")),
        LedgerEnd::Requeue(id) => Some(format!(
            "UPDATE hook_events_claims SET holder = NULL, isolated = FALSE WHERE id = '{id}' AND isolated"
        )),
    }
}

/// The SQL that ends a batch's transaction, after its outcomes: what becomes of its ledger row,
/// then COMMIT. Sent as one simple query, so that when an outcome statement failed before it,
/// its first statement fails too ("current transaction is aborted") and COMMIT is skipped: the
/// transaction stays open, holding its locks, for the row-by-row fallback.
pub(crate) fn commit_sql(end: LedgerEnd) -> String {
    format!("{}; COMMIT", ledger_sql(end).unwrap_or_else(|| "SELECT 1".to_owned()))
}

/// What becomes of a batch's ledger row when its transaction ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LedgerEnd {
    /// There is none, or it stays as it is.
    Keep,
    /// It is dropped.
    Forget(Uuid),
    /// Its event goes back in the queue of suspects (no holder).
    Requeue(Uuid),
}

/// Whether a transaction committed: `Some(true)` committed, `Some(false)` aborted, `None` still
/// in progress or unknown.
pub(crate) async fn xact_committed(
    client: &impl GenericClient,
    xid: &str,
) -> Result<Option<bool>, StoreError> {
    let status: Option<String> = client.query_one(XACT_STATUS, &[&xid]).await?.try_get(0)?;
    Ok(match status.as_deref() {
        Some("committed") => Some(true),
        Some("aborted") => Some(false),
        _ => None,
    })
}

/// The parameters of the two completion statements, split from a batch of outcomes.
#[derive(Debug, Default)]
pub(crate) struct Completion {
    ok_ids: Vec<Uuid>,
    ok_metadata: Vec<Value>,
    failed_ids: Vec<Uuid>,
    errors: Vec<String>,
    failed_metadata: Vec<Value>,
    delays_ms: Vec<i64>,
    dead: Vec<bool>,
}

impl Completion {
    pub(crate) fn new(outcomes: Vec<Outcome>) -> Self {
        let mut c = Completion::default();
        for Outcome { id, resolution, metadata } in outcomes {
            match resolution {
                Resolution::Succeeded => {
                    c.ok_ids.push(id);
                    c.ok_metadata.push(Value::Object(metadata));
                }
                Resolution::Failed { error, retry_after } => {
                    c.failed_ids.push(id);
                    c.errors.push(error);
                    c.failed_metadata.push(Value::Object(metadata));
                    c.delays_ms.push(retry_after.map_or(0, duration_ms));
                    c.dead.push(retry_after.is_none());
                }
            }
        }
        c
    }

    pub(crate) fn len(&self) -> usize {
        self.ok_ids.len() + self.failed_ids.len()
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What [`record_outcomes_and_commit`] wrote.
#[derive(Debug, Default)]
pub(crate) struct Written {
    /// Rows updated with their outcome.
    pub(crate) rows: u64,
    /// Events whose outcome could not be written, set aside instead, with the reason.
    pub(crate) set_aside: Vec<(Uuid, String)>,
}

/// Why [`record_outcomes_and_commit`] failed.
#[derive(Debug)]
pub(crate) struct CommitError {
    pub(crate) error: StoreError,
    /// COMMIT was sent and no answer came back (the connection was lost): it may have committed.
    pub(crate) maybe_committed: bool,
    /// What was set aside, should it turn out to have committed.
    pub(crate) set_aside: Vec<(Uuid, String)>,
}

impl CommitError {
    fn known(error: impl Into<StoreError>) -> Self {
        Self { error: error.into(), maybe_committed: false, set_aside: Vec::new() }
    }
}

/// Whether an error means the connection is gone (rather than that the server refused a
/// statement): a client-side error, or the server ending the session (operator intervention,
/// connection exception).
fn is_connection_error(error: &tokio_postgres::Error) -> bool {
    match error.as_db_error() {
        None => true,
        Some(db) => {
            let code = db.code().code();
            code.starts_with("57") || code.starts_with("08")
        }
    }
}

/// Writes a batch of outcomes and commits the claim's transaction: a savepoint, one statement
/// for the successes, one for the failures, and `commit` (see [`commit_sql`]), pipelined into
/// one round trip.
///
/// The statements are prepared first, on purpose. A statement still being prepared is sent only
/// after its Parse round trip, so COMMIT would overtake it and the update would run after the
/// claim's locks were released, unfenced. Executes of prepared statements go out on their first
/// poll, and `join!` polls in order, so the server sees the updates before COMMIT.
///
/// If an outcome statement fails (a user's trigger or constraint refuses a row, the server's
/// encoding refuses a text), COMMIT is skipped (see [`commit_sql`]) and the transaction returns
/// to the claim's savepoint and takes the events' locks again; the outcomes are then written one
/// at a time, each in a savepoint of its own, and one that cannot be written is set aside instead
/// (see [`write_one_by_one`]), so that its batch-mates commit.
pub(crate) async fn record_outcomes_and_commit(
    client: &impl GenericClient,
    c: &Completion,
    commit: &str,
    guard: Option<Guard<'_>>,
) -> Result<Written, CommitError> {
    let succeed_statement = client.prepare_cached(SUCCEED).await.map_err(CommitError::known)?;
    let fail_statement = client.prepare_cached(FAIL).await.map_err(CommitError::known)?;
    // Deferred constraints are checked at each statement, where a refusal can be caught, not at
    // COMMIT, where it would roll the batch back.
    let open = client.batch_execute(OUTCOME_OPEN);
    let succeed = async {
        if c.ok_ids.is_empty() {
            return Ok(0);
        }
        client.execute(&succeed_statement, &[&c.ok_ids, &c.ok_metadata]).await
    };
    let fail = async {
        if c.failed_ids.is_empty() {
            return Ok(0);
        }
        client
            .execute(&fail_statement, &[&c.failed_ids, &c.errors, &c.failed_metadata, &c.delays_ms, &c.dead])
            .await
    };
    let (opened, succeeded, failed, committed) =
        futures::join!(open, succeed, fail, client.batch_execute(commit));
    let committed = match committed {
        Err(error) if is_connection_error(&error) => {
            return Err(CommitError { error: error.into(), maybe_committed: true, set_aside: Vec::new() });
        }
        other => other,
    };
    opened.map_err(CommitError::known)?;
    let refused = [&succeeded, &failed]
        .into_iter()
        .find_map(|r| r.as_ref().err().filter(|e| !is_connection_error(e)))
        .map(db_text);
    match (succeeded, failed, committed) {
        (Ok(a), Ok(b), Ok(())) => Ok(Written { rows: a + b, set_aside: Vec::new() }),
        _ if refused.is_some() => {
            let refused = refused.unwrap_or_default();
            warn!(error = %refused, outcomes = c.len(), "writing the batch's outcomes failed; writing them one at a time");
            write_one_by_one(client, c, &succeed_statement, &fail_statement, commit, guard).await
        }
        (_, _, committed) => {
            // The savepoint, the ledger statement or COMMIT itself failed: nothing is written.
            let _ = client.batch_execute("ROLLBACK").await;
            Err(CommitError::known(
                committed
                    .err()
                    .map_or_else(|| StoreError::Pool("writing the outcomes failed".into()), StoreError::from),
            ))
        }
    }
}

fn db_text(error: &tokio_postgres::Error) -> String {
    crate::migrate::db_error_text(error)
}

/// The fallback of [`record_outcomes_and_commit`]: back to the claim's savepoint (which drops
/// the row locks: no other claim takes the events meanwhile, since the batch's ledger row names
/// them, made by `guard` one that [`CLAIM`] reads, and [`CLAIM`] skips the events such a row
/// names), the events locked again, then each
/// outcome in a savepoint of its own; an outcome the server refuses is tried again plainly (its error text
/// made ASCII, no metadata), then the event is set aside as dead with the reason, and if even
/// that is refused, it is quarantined in the claim ledger (kept out of every claim, with the
/// reason). Then `commit`.
async fn write_one_by_one(
    client: &impl GenericClient,
    c: &Completion,
    succeed: &tokio_postgres::Statement,
    fail: &tokio_postgres::Statement,
    commit: &str,
    guard: Option<Guard<'_>>,
) -> Result<Written, CommitError> {
    // The batch's ledger row is made one that every claim reads (no processor) before the locks
    // are dropped, on another connection, autocommitted.
    if let Some(Guard { pool, ledger }) = guard {
        let guarded =
            async { pool.get().await?.execute(GUARD_CLAIM, &[&ledger]).await.map_err(StoreError::from) };
        guarded.await.map_err(CommitError::known)?;
    }
    // Back to the savepoint first: until then the transaction refuses every statement, even a
    // Parse. The locks are dropped for one round trip, during which the ledger row keeps other
    // claims off the events.
    client
        .batch_execute(&format!("ROLLBACK TO SAVEPOINT hook_claim; {OUTCOME_OPEN}"))
        .await
        .map_err(CommitError::known)?;
    let ids: Vec<Uuid> = c.ok_ids.iter().chain(&c.failed_ids).copied().collect();
    client.query_one(RELOCK, &[&ids]).await.map_err(CommitError::known)?;
    let set_aside_statement = client.prepare_cached(SET_ASIDE).await.map_err(CommitError::known)?;
    let empty = Value::Object(serde_json::Map::new());
    let mut written = Written::default();
    for (i, id) in c.ok_ids.iter().enumerate() {
        let full =
            in_savepoint(client, succeed, &[&[*id].as_slice(), &[c.ok_metadata[i].clone()].as_slice()])
                .await?;
        let refused = match full {
            Ok(n) => {
                written.rows += n;
                continue;
            }
            Err(refused) => refused,
        };
        match in_savepoint(client, succeed, &[&[*id].as_slice(), &[empty.clone()].as_slice()]).await? {
            Ok(n) => written.rows += n,
            Err(_) => {
                let reason =
                    format!("the handler succeeded, but the outcome could not be written ({refused})");
                set_aside_one(client, &set_aside_statement, *id, &reason, &mut written).await?;
            }
        }
    }
    for (i, id) in c.failed_ids.iter().enumerate() {
        let (delay, dead) = (c.delays_ms[i], c.dead[i]);
        let full = in_savepoint(
            client,
            fail,
            &[
                &[*id].as_slice(),
                &[c.errors[i].clone()].as_slice(),
                &[c.failed_metadata[i].clone()].as_slice(),
                &[delay].as_slice(),
                &[dead].as_slice(),
            ],
        )
        .await?;
        let refused = match full {
            Ok(n) => {
                written.rows += n;
                continue;
            }
            Err(refused) => refused,
        };
        let plain = ascii(&c.errors[i]);
        match in_savepoint(
            client,
            fail,
            &[
                &[*id].as_slice(),
                &[plain.clone()].as_slice(),
                &[empty.clone()].as_slice(),
                &[delay].as_slice(),
                &[dead].as_slice(),
            ],
        )
        .await?
        {
            Ok(n) => written.rows += n,
            Err(_) => {
                let reason =
                    format!("the handler failed ({plain}), and the outcome could not be written ({refused})");
                set_aside_one(client, &set_aside_statement, *id, &reason, &mut written).await?;
            }
        }
    }
    match client.batch_execute(commit).await {
        Ok(()) => Ok(written),
        Err(error) if is_connection_error(&error) => {
            Err(CommitError { error: error.into(), maybe_committed: true, set_aside: written.set_aside })
        }
        Err(error) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(CommitError::known(error))
        }
    }
}

/// Sets one event aside as dead with `reason`, or, if the server refuses even that, quarantines
/// it in the claim ledger.
async fn set_aside_one(
    client: &impl GenericClient,
    set_aside: &tokio_postgres::Statement,
    id: Uuid,
    reason: &str,
    written: &mut Written,
) -> Result<(), CommitError> {
    let reason = hook_core::bound_text(&ascii(&format!("{reason}; set aside as dead")));
    match in_savepoint(client, set_aside, &[&[id].as_slice(), &[reason.clone()].as_slice()]).await? {
        Ok(_) => written.set_aside.push((id, reason)),
        Err(refused) => {
            let note = hook_core::bound_text(&ascii(&format!(
                "{reason}, which was refused too ({refused}): kept out of every claim until this row is deleted"
            )));
            client.execute(QUARANTINE, &[&id, &note]).await.map_err(CommitError::known)?;
            written.set_aside.push((id, note));
        }
    }
    Ok(())
}

/// Runs one statement in a savepoint: `Ok(Ok(rows))` when it worked, `Ok(Err(reason))` when the
/// server refused it (rolled back to the savepoint), `Err` when the connection failed.
async fn in_savepoint(
    client: &impl GenericClient,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Result<u64, String>, CommitError> {
    let (saved, result) =
        futures::join!(client.batch_execute("SAVEPOINT hook_row"), client.execute(statement, params));
    saved.map_err(CommitError::known)?;
    match result {
        Ok(rows) => {
            client.batch_execute("RELEASE SAVEPOINT hook_row").await.map_err(CommitError::known)?;
            Ok(Ok(rows))
        }
        Err(error) if !is_connection_error(&error) => {
            client.batch_execute("ROLLBACK TO SAVEPOINT hook_row").await.map_err(CommitError::known)?;
            Ok(Err(db_text(&error)))
        }
        Err(error) => Err(CommitError::known(error)),
    }
}

/// Text any server encoding can store: characters outside ASCII become `\u{...}` escapes.
fn ascii(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        if ch.is_ascii() && ch != '\0' {
            out.push(ch);
        } else {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(ch)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_escapes_what_an_encoding_may_refuse() {
        assert_eq!(ascii("a€b\0"), "a\\u{20ac}b\\u{0}");
    }

    #[test]
    fn commit_sql_names_the_ledger_row() {
        let id = Uuid::nil();
        assert_eq!(commit_sql(LedgerEnd::Keep), "SELECT 1; COMMIT");
        let forget = commit_sql(LedgerEnd::Forget(id));
        assert_eq!(
            forget,
            "DELETE FROM hook_events_claims WHERE id = '00000000-0000-0000-0000-000000000000'; COMMIT"
        );
        assert!(commit_sql(LedgerEnd::Requeue(id)).contains("SET holder = NULL, isolated = FALSE"));
    }
}
