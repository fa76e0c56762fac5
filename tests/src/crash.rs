//! A processor's death as the database sees it: its sessions terminated, its claim's
//! transaction aborted. Store-level tests use these instead of killing a process.

use std::time::Duration;

use tokio_postgres::Client;

use crate::count;
use crate::worker::Deadline;

const PATIENCE: Duration = Duration::from_secs(60);

/// Waits until a store's presence is registered (a store registers at its first claim).
pub async fn registered(client: &Client) {
    let deadline = Deadline::new(PATIENCE, "a store's presence to be registered");
    while count(client, "SELECT count(*) FROM hook_events_processors").await == 0 {
        deadline.tick().await;
    }
}

/// As when the claim's process dies: terminates the sessions that hold the stores' presence
/// locks (one-key advisory locks in this database: a claim's session locks have two keys,
/// `objsubid` 2), then the claim's (see [`kill_the_claim`]).
pub async fn kill_the_processor(client: &Client) {
    let presence = "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks AS l \
                    WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted \
                      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    assert!(count(client, presence).await >= 1, "a presence session to kill");
    kill_the_claim(client).await;
}

/// Terminates the session that holds a claim (idle in transaction) and waits until it is gone:
/// its transaction is aborted, as when its process dies.
pub async fn kill_the_claim(client: &Client) {
    let holders = "FROM pg_stat_activity \
                   WHERE datname = current_database() AND state LIKE 'idle in transaction%'";
    let killed = count(client, &format!("SELECT count(pg_terminate_backend(pid)) {holders}")).await;
    assert_eq!(killed, 1, "one claim to kill");
    let deadline = Deadline::new(PATIENCE, "the killed claim's session to end");
    while count(client, &format!("SELECT count(*) {holders}")).await > 0 {
        deadline.tick().await;
    }
}
