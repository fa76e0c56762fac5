//! The vacuum task: `VACUUM hook_events` whenever its dead row versions pass a threshold, checked
//! every interval (`HOOK_VACUUM_DEAD_TUPLES`, `HOOK_VACUUM_INTERVAL`).
//!
//! Autovacuum looks at a table at most once per `autovacuum_naptime` (server-wide, a minute by
//! default), and a queue at thousands of events per second leaves a dead row version per
//! completion and one per archived row: a minute's worth is hundreds of thousands, which every
//! claim's index scans and every later vacuum pay for. So the processor vacuums between naps.
//! Its limits:
//! - one processor of several at a time: the `VACUUM` runs under a session advisory lock, tried
//!   without waiting; a processor that finds it taken skips its turn;
//! - no work that cannot help: under a held snapshot (a long report, an `idle in transaction`
//!   client, a replication slot) a vacuum removes nothing. When a vacuum left the table above
//!   the threshold while the oldest snapshot holder ([`hook_store::vacuum::horizon`]) stayed the
//!   same, the task waits until that holder changes, or, in case something it cannot see holds
//!   the rows, until a backoff from a minute (doubling up to 15 minutes) has passed;
//! - a role that may not vacuum the table (only its owner may, or on PostgreSQL 17 a role with
//!   `MAINTAIN`) is told once, at warn, what to grant or do, and the task stops: processing goes
//!   on, and the table is left to autovacuum.
//!
//! The decisions are [`Policy`], a pure function of what was read and the time, so they are
//! tested without a database; the loop around it is [`run`].

use std::time::{Duration, Instant};

use hook_store::deadpool_postgres::{Object, Pool};
use hook_store::{vacuum, StoreError};
use tracing::{debug, info, warn};

/// The vacuum task's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VacuumConfig {
    /// `VACUUM` once `n_dead_tup` reaches this; `None`: the task is off.
    pub(crate) dead_tuples: Option<u64>,
    /// How often `n_dead_tup` is read.
    pub(crate) interval: Duration,
}

/// The first wait after a vacuum that could remove nothing with the horizon unchanged.
const FIRST_BACKOFF: Duration = Duration::from_secs(60);
/// The longest.
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);

/// The first wait after a `VACUUM` that `SKIP_LOCKED` skipped (another session held the table),
/// doubling with each skip in a row up to [`MAX_SKIP_BACKOFF`]: an index build or autovacuum may
/// hold the table for an hour, and each skip writes a warning into the server's log.
const FIRST_SKIP_BACKOFF: Duration = Duration::from_secs(1);
/// The longest.
const MAX_SKIP_BACKOFF: Duration = Duration::from_secs(60);

/// The task's memory of the last vacuum that could not help.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stuck {
    /// The oldest snapshot holder then.
    horizon: Option<String>,
    /// Try again no sooner than this, even if the holder is still there.
    retry_at: Instant,
    backoff: Duration,
}

/// When to vacuum: a pure function of the dead row versions, the horizon and the time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Policy {
    threshold: i64,
    stuck: Option<Stuck>,
    /// After skips in a row: no sooner than this, and the wait that led to it.
    skipped: Option<(Instant, Duration)>,
}

impl Policy {
    pub(crate) fn new(threshold: u64) -> Self {
        Self { threshold: i64::try_from(threshold).unwrap_or(i64::MAX), stuck: None, skipped: None }
    }

    /// Whether to vacuum now, with `dead` dead row versions and `horizon` the oldest snapshot
    /// holder.
    pub(crate) fn due(&self, dead: i64, horizon: Option<&str>, now: Instant) -> bool {
        if dead < self.threshold {
            return false;
        }
        if matches!(self.skipped, Some((retry_at, _)) if now < retry_at) {
            return false;
        }
        match &self.stuck {
            None => true,
            Some(stuck) => stuck.horizon.as_deref() != horizon || now >= stuck.retry_at,
        }
    }

    /// After a vacuum that started with `before` as the horizon and left `dead_after` dead row
    /// versions with `after` as the horizon: whether it could not help (the table still at the
    /// threshold while the same holder held its snapshot throughout), which makes the next
    /// vacuum wait for the holder to change or the backoff to pass. Returns whether it was stuck.
    pub(crate) fn vacuumed(
        &mut self,
        before: Option<&str>,
        dead_after: i64,
        after: Option<&str>,
        now: Instant,
    ) -> bool {
        self.skipped = None;
        let held = before.is_some() && before == after;
        if !(held && dead_after >= self.threshold) {
            self.stuck = None;
            return false;
        }
        let backoff = match &self.stuck {
            Some(stuck) if stuck.horizon.as_deref() == after => (stuck.backoff * 2).min(MAX_BACKOFF),
            _ => FIRST_BACKOFF,
        };
        self.stuck = Some(Stuck { horizon: after.map(str::to_owned), retry_at: now + backoff, backoff });
        true
    }

    /// After a `VACUUM` that was skipped (another session held a conflicting lock on the table):
    /// it tried nothing, so it says nothing of a held snapshot; the next try waits 1 s, and
    /// twice as long after each further skip in a row, up to a minute.
    pub(crate) fn skipped(&mut self, now: Instant) {
        let backoff = match self.skipped {
            Some((_, backoff)) => (backoff * 2).min(MAX_SKIP_BACKOFF),
            None => FIRST_SKIP_BACKOFF,
        };
        self.skipped = Some((now + backoff, backoff));
    }

    /// Whether the last vacuum could not help and the task is waiting.
    #[cfg(test)]
    pub(crate) fn is_stuck(&self) -> bool {
        self.stuck.is_some()
    }
}

/// Runs the task on `pool` (a pool of its own, one connection) until the process ends. Returns
/// when the task is off or the role may not vacuum the table.
pub(crate) async fn run(pool: Pool, config: VacuumConfig) {
    let Some(threshold) = config.dead_tuples else { return };
    let mut policy = Policy::new(threshold);
    let mut checked_right = false;
    // Whether a VACUUM's count is in the statistics as it returns (PostgreSQL 15 and later), so
    // that a skipped one can be told from one that ran.
    let mut counts_at_once = false;
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        tick.tick().await;
        let client = match pool.get().await {
            Ok(client) => client,
            Err(error) => {
                failed(&mut failures, &StoreError::Pool(error.to_string()));
                continue;
            }
        };
        if !checked_right {
            match vacuum::may_vacuum(&client).await {
                Ok((true, _)) => match vacuum::counts_at_once(&client).await {
                    Ok(at_once) => (checked_right, counts_at_once) = (true, at_once),
                    Err(error) => {
                        failed(&mut failures, &error);
                        continue;
                    }
                },
                Ok((false, owner)) => {
                    no_right(&owner);
                    return;
                }
                Err(error) => {
                    failed(&mut failures, &error);
                    continue;
                }
            }
        }
        match step(&client, &mut policy, counts_at_once, Instant::now()).await {
            Ok(Step::Denied) => {
                let owner = vacuum::may_vacuum(&client).await.map(|(_, owner)| owner).unwrap_or_default();
                no_right(&owner);
                return;
            }
            Ok(_) => failures = 0,
            Err(error) => {
                failed(&mut failures, &error);
                // Its session may still hold the lock: close it rather than hand it back.
                drop(Object::take(client));
            }
        }
    }
}

/// What one check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Below the threshold, or waiting for the horizon to move.
    Waited,
    /// Another processor's vacuum holds the lock.
    Busy,
    /// Vacuumed.
    Vacuumed,
    /// The `VACUUM` skipped the table: another session held a conflicting lock.
    Skipped,
    /// The server refused the `VACUUM` for want of a privilege.
    Denied,
}

/// One check: reads, decides, and vacuums if due. `counts_at_once`: a skipped `VACUUM` can be
/// told by its count (PostgreSQL 15 and later); before, the count reaches the statistics later,
/// and every `VACUUM` is taken to have run.
async fn step(
    client: &Object,
    policy: &mut Policy,
    counts_at_once: bool,
    now: Instant,
) -> Result<Step, StoreError> {
    let dead = vacuum::dead_tuples(client).await?;
    let horizon = vacuum::horizon(client).await?;
    if !policy.due(dead, horizon.as_deref(), now) {
        return Ok(Step::Waited);
    }
    if !vacuum::try_lock(client).await? {
        return Ok(Step::Busy);
    }
    // Read under the lock, so that no other processor's VACUUM counts between the two readings.
    // (On an error the caller closes the session, which releases the lock.)
    let (count_before, _) = vacuum::vacuum_counts(client).await?;
    let started = Instant::now();
    let result = vacuum::vacuum(client).await;
    let unlocked = vacuum::unlock(client).await;
    match result {
        Err(StoreError::Db(error))
            if error.code() == Some(&hook_store::tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
        {
            return Ok(Step::Denied);
        }
        other => other?,
    }
    unlocked?;
    // `SKIP_LOCKED` skips the table, with only a warning, while another session holds a lock
    // that conflicts (autovacuum or an ANALYZE on it, an index build): nothing was tried, so
    // nothing says a snapshot is held. The vacuum count tells (it grows as a VACUUM ends; the
    // lock keeps other processors' out, an operator's by hand would only count as ours).
    let (count_after, _) = vacuum::vacuum_counts(client).await?;
    if counts_at_once && count_after == count_before {
        policy.skipped(Instant::now());
        debug!(
            dead,
            "VACUUM hook_events skipped: another session holds a conflicting lock on the table \
             (autovacuum, ANALYZE, an index build); trying again later"
        );
        return Ok(Step::Skipped);
    }
    let dead_after = vacuum::dead_tuples(client).await?;
    let after = vacuum::horizon(client).await?;
    let stuck = policy.vacuumed(horizon.as_deref(), dead_after, after.as_deref(), Instant::now());
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if stuck {
        info!(
            dead_before = dead,
            dead_after,
            elapsed_ms,
            oldest_xmin = after.as_deref().unwrap_or(""),
            "VACUUM hook_events could not remove the dead row versions: a snapshot older than them is \
             held (see pg_stat_activity, oldest backend_xmin first); not vacuuming again until it is \
             released"
        );
    } else {
        debug!(dead_before = dead, dead_after, elapsed_ms, "VACUUM hook_events");
    }
    Ok(Step::Vacuumed)
}

fn no_right(owner: &str) {
    warn!(
        owner,
        "this role may not VACUUM hook_events (only its owner, the database's owner or a superuser may; \
         on PostgreSQL 17 also a role granted MAINTAIN on it): the vacuum task stops and dead row \
         versions wait for autovacuum, at most once per autovacuum_naptime. Run hook-processor as the \
         table's owner, or on PostgreSQL 17 `GRANT MAINTAIN ON hook_events TO` this role, or set \
         HOOK_VACUUM_DEAD_TUPLES=0 to turn the task off"
    );
}

/// A failed check: warned on the first of a streak and every 30th (as the claims' failures).
fn failed(failures: &mut u32, error: &StoreError) {
    if failures.is_multiple_of(30) {
        warn!(%error, "vacuum task: reading or vacuuming hook_events failed; trying again");
    }
    *failures += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vacuums_past_the_threshold_only() {
        let now = Instant::now();
        let policy = Policy::new(20_000);
        assert!(!policy.due(19_999, None, now));
        assert!(policy.due(20_000, None, now));
        assert!(policy.due(50_000, Some("123"), now));
    }

    #[test]
    fn a_vacuum_under_a_held_snapshot_waits_for_the_holder_to_change_or_the_backoff() {
        let now = Instant::now();
        let mut policy = Policy::new(20_000);
        assert!(policy.vacuumed(Some("100"), 30_000, Some("100"), now));
        assert!(policy.is_stuck());
        // The same holder: not every interval.
        assert!(!policy.due(40_000, Some("100"), now + Duration::from_secs(1)));
        assert!(!policy.due(40_000, Some("100"), now + Duration::from_secs(59)));
        // The backoff passed: once more, and then twice as long.
        assert!(policy.due(40_000, Some("100"), now + FIRST_BACKOFF));
        let later = now + FIRST_BACKOFF;
        assert!(policy.vacuumed(Some("100"), 40_000, Some("100"), later));
        assert!(!policy.due(40_000, Some("100"), later + FIRST_BACKOFF));
        assert!(policy.due(40_000, Some("100"), later + FIRST_BACKOFF * 2));
        // Another holder (the snapshot was released): at once.
        assert!(policy.due(40_000, Some("250"), later + Duration::from_secs(1)));
        assert!(policy.due(40_000, None, later + Duration::from_secs(1)));
        // A vacuum that helped clears it.
        assert!(!policy.vacuumed(Some("250"), 100, Some("260"), later));
        assert!(!policy.is_stuck());
    }

    #[test]
    fn dead_rows_left_by_concurrent_load_are_not_a_held_snapshot() {
        let now = Instant::now();
        let mut policy = Policy::new(20_000);
        // The horizon moved during the vacuum (short claims came and went): the dead rows counted
        // after it are new ones, not ones it could not remove.
        assert!(!policy.vacuumed(Some("100"), 30_000, Some("140"), now));
        assert!(!policy.vacuumed(None, 30_000, None, now));
        assert!(policy.due(30_000, Some("140"), now));
    }

    #[test]
    fn skips_in_a_row_wait_longer_each_time_and_a_vacuum_that_ran_ends_the_wait() {
        let now = Instant::now();
        let mut policy = Policy::new(20_000);
        policy.skipped(now);
        assert!(!policy.due(30_000, None, now + Duration::from_millis(500)));
        assert!(policy.due(30_000, None, now + FIRST_SKIP_BACKOFF));
        // The second skip in a row: 2 s; then 4, 8, ... up to a minute.
        let mut at = now + FIRST_SKIP_BACKOFF;
        policy.skipped(at);
        assert!(!policy.due(30_000, None, at + Duration::from_millis(1_999)));
        assert!(policy.due(30_000, None, at + Duration::from_secs(2)));
        for _ in 0..10 {
            at += MAX_SKIP_BACKOFF;
            policy.skipped(at);
        }
        assert!(!policy.due(30_000, None, at + MAX_SKIP_BACKOFF - Duration::from_millis(1)));
        assert!(policy.due(30_000, None, at + MAX_SKIP_BACKOFF));
        // A skip is not a held snapshot, and a vacuum that ran clears the skips.
        assert!(!policy.is_stuck());
        assert!(!policy.vacuumed(None, 100, None, at + MAX_SKIP_BACKOFF));
        policy.skipped(at + MAX_SKIP_BACKOFF);
        assert!(policy.due(30_000, None, at + MAX_SKIP_BACKOFF + FIRST_SKIP_BACKOFF));
    }

    #[test]
    fn the_backoff_is_bounded() {
        let mut now = Instant::now();
        let mut policy = Policy::new(1);
        for _ in 0..20 {
            policy.vacuumed(Some("7"), 10, Some("7"), now);
            now += MAX_BACKOFF;
            assert!(policy.due(10, Some("7"), now));
        }
    }
}
