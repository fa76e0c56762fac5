//! Deadlines on calls to the database, so that a network gone silent fails a call in seconds
//! instead of leaving it waiting for TCP to give up (about 15 minutes of retransmissions, or
//! forever for a connection that has nothing in flight).
//!
//! TCP keepalives and `tcp_user_timeout` ([`apply_network_defaults`]) close a dead connection in
//! the kernel, but only one whose peer stops acknowledging: a proxy, a pooler or a frozen server
//! process that still acknowledges packets but never answers is caught by these deadlines alone.
//! A call past its deadline is dropped halfway; every such call here owns its connection
//! (the claim's `TxConn` in `pg.rs`, the LISTEN task's own client), which is dropped with it and
//! never reused, so nothing later inherits its transaction or its unanswered requests. (The
//! driver closes the socket once it errors, or once the replies already asked for arrive; the
//! server ends the session, and rolls back what it had not committed, when it hears the close,
//! or at the claim's `idle_in_transaction_session_timeout`.)
//!
//! [`apply_network_defaults`]: crate::apply_network_defaults

use std::future::Future;
use std::time::Duration;

use crate::error::StoreError;

/// The default deadline of one claim, keep-alive, completion, pooled connect or LISTEN ping
/// ([`StoreOptions::call_timeout`](crate::StoreOptions::call_timeout)): 20 s.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `call`, failing with [`StoreError::Timeout`] naming `what` when it takes longer than
/// `limit` (the call is then dropped).
pub(crate) async fn within<T, E>(
    limit: Duration,
    what: &'static str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, StoreError>
where
    StoreError: From<E>,
{
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(StoreError::from),
        Err(_) => Err(StoreError::Timeout { what, after: limit }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_past_its_deadline_fails_with_what_it_was() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, StoreError>(())
        };
        let error = within(Duration::from_millis(20), "claim", slow).await.unwrap_err();
        assert!(matches!(error, StoreError::Timeout { what: "claim", .. }), "{error:?}");
        assert_eq!(error.to_string(), "claim: no answer from the database within 0.02s");
        let quick = async { Ok::<_, StoreError>(7) };
        assert_eq!(within(Duration::from_secs(1), "claim", quick).await.unwrap(), 7);
    }
}
