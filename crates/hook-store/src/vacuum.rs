//! The SQL of the processor's vacuum task: what it reads to decide whether to run `VACUUM
//! hook_events`, the lock that lets one processor of several run it at a time, and the `VACUUM`
//! itself. The task's loop and its decisions live in the binary (`bins/processor/src/vacuum.rs`).
//!
//! Why a task at all: migration 0015 sets `hook_events`' autovacuum to start at 10,000 dead row
//! versions with no cost delay, but autovacuum looks at a table at most once per
//! `autovacuum_naptime` (a server-wide setting, one minute by default): at 15,000 events per
//! second a minute leaves about a million dead row versions. The task checks every second.
//!
//! Every function runs on a connection outside a transaction (`VACUUM` cannot run in one).

use deadpool_postgres::GenericClient;

use crate::error::StoreError;

/// Advisory lock key of the vacuum task ("hookvacu" in ASCII): held, session-level, only while
/// one processor's `VACUUM` runs, and tried without waiting.
pub const VACUUM_LOCK: i64 = 0x686f_6f6b_7661_6375;

/// `hook_events`' `n_dead_tup` (0 before the statistics know the table). The statistics lag by
/// up to a second (each backend reports at most once a second).
pub async fn dead_tuples(client: &impl GenericClient) -> Result<i64, StoreError> {
    Ok(client
        .query_one(
            "SELECT coalesce((SELECT n_dead_tup FROM pg_stat_user_tables \
                              WHERE relid = 'hook_events'::regclass), 0)",
            &[],
        )
        .await?
        .try_get(0)?)
}

/// The oldest transaction id that holds back what any vacuum may remove, as text, or `None`
/// when nothing does: the oldest `backend_xmin` or `backend_xid` of another session of this
/// database (a long report, an `idle in transaction` client, a backup), a replication slot's
/// `xmin`, a prepared transaction. Compared with an earlier reading, it tells whether a vacuum
/// that could remove nothing is worth repeating: while it has not moved, it is not.
pub async fn horizon(client: &impl GenericClient) -> Result<Option<String>, StoreError> {
    const HORIZON: &str = "SELECT x::text FROM ( \
            SELECT backend_xmin AS x FROM pg_stat_activity \
             WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid() \
               AND (datid IS NULL OR datid = (SELECT oid FROM pg_database WHERE datname = current_database())) \
            UNION ALL \
            SELECT backend_xid FROM pg_stat_activity \
             WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
               AND (datid IS NULL OR datid = (SELECT oid FROM pg_database WHERE datname = current_database())) \
            UNION ALL \
            SELECT xmin FROM pg_replication_slots WHERE xmin IS NOT NULL \
            UNION ALL \
            SELECT transaction FROM pg_prepared_xacts \
        ) AS holders ORDER BY age(x) DESC LIMIT 1";
    Ok(client.query_opt(HORIZON, &[]).await?.map(|row| row.try_get(0)).transpose()?)
}

/// Whether this session's role may `VACUUM hook_events`: its owner (or a member of the owner's
/// role), the database's owner, a superuser, or (PostgreSQL 17 and later) a role with the
/// `MAINTAIN` privilege on it. Without the right, `VACUUM` does not fail: it warns and skips the
/// table, so the task asks first. Returns the answer and the table's owner.
pub async fn may_vacuum(client: &impl GenericClient) -> Result<(bool, String), StoreError> {
    let version = server_version(client).await?;
    let maintain = if version >= 170_000 { "OR has_table_privilege(c.oid, 'MAINTAIN')" } else { "" };
    let sql = format!(
        "SELECT pg_has_role(c.relowner, 'USAGE') \
                OR pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE') \
                {maintain}, \
                pg_get_userbyid(c.relowner)::text \
           FROM pg_class AS c WHERE c.oid = 'hook_events'::regclass"
    );
    let row = client.query_one(sql.as_str(), &[]).await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Whether a `VACUUM`'s count (`vacuum_count`) is in the statistics when it returns: on
/// PostgreSQL 15 and later, whose statistics live in shared memory. Before, a collector process
/// receives them a while later, and a count read at once may not show a `VACUUM` that ran.
pub async fn counts_at_once(client: &impl GenericClient) -> Result<bool, StoreError> {
    let version = server_version(client).await?;
    Ok(version >= 150_000)
}

/// The server's `server_version_num` (150020 for 15.20).
async fn server_version(client: &impl GenericClient) -> Result<i32, StoreError> {
    Ok(client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.try_get(0)?)
}

/// Takes the vacuum lock if it is free (no wait): `false` when another processor's vacuum holds
/// it.
pub async fn try_lock(client: &impl GenericClient) -> Result<bool, StoreError> {
    Ok(client.query_one("SELECT pg_try_advisory_lock($1)", &[&VACUUM_LOCK]).await?.try_get(0)?)
}

/// Releases the lock of [`try_lock`].
pub async fn unlock(client: &impl GenericClient) -> Result<(), StoreError> {
    client.execute("SELECT pg_advisory_unlock($1)", &[&VACUUM_LOCK]).await?;
    Ok(())
}

/// `VACUUM (SKIP_LOCKED) hook_events`: removes the dead row versions no snapshot can see and
/// their index entries. Takes only the lock autovacuum takes (writers go on); skips the table
/// rather than wait when someone holds a conflicting lock (autovacuum on the table, a
/// migration).
pub async fn vacuum(client: &impl GenericClient) -> Result<(), StoreError> {
    client.batch_execute("VACUUM (SKIP_LOCKED) hook_events").await?;
    Ok(())
}

/// How many times `hook_events` was vacuumed by hand (`VACUUM`) and by autovacuum, per the
/// statistics.
pub async fn vacuum_counts(client: &impl GenericClient) -> Result<(i64, i64), StoreError> {
    let row = client
        .query_one(
            "SELECT coalesce(vacuum_count, 0), coalesce(autovacuum_count, 0) FROM pg_stat_user_tables \
              WHERE relid = 'hook_events'::regclass",
            &[],
        )
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}
