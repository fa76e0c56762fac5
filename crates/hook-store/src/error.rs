//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong in `hook-store`.
///
/// Messages are lowercase, without a trailing period, and never contain a password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A query or connection failed.
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),

    /// A claim ended (its transaction is gone) before the engine could use it.
    #[error("claim lost: {0}")]
    ClaimLost(String),

    /// The connection was lost after COMMIT was sent, and whether it committed could not be
    /// found out; the next claim tells (the events are processed, or come back as suspects).
    #[error("outcome unknown; the next claim will tell: {0}")]
    OutcomeUnknown(String),

    /// No connection could be taken from the pool.
    #[error("connection pool: {0}")]
    Pool(String),

    /// The connection settings are not usable.
    #[error("invalid database configuration: {0}")]
    Config(String),

    /// A migration failed or the recorded migrations disagree with this build's.
    #[error("migration {version} ({name}): {reason}")]
    Migration {
        /// The migration's version number.
        version: i32,
        /// The migration's file name.
        name: String,
        /// What went wrong.
        reason: String,
    },

    /// No PostgreSQL server binaries were found for the embedded cluster.
    #[error(
        "no PostgreSQL server binaries found (looked on PATH, in `pg_config --bindir` and under \
         /usr/lib/postgresql/*/bin): install PostgreSQL (e.g. `apt-get install postgresql`) or set \
         DATABASE_URL"
    )]
    NoPostgresBinaries,

    /// The embedded cluster could not be created, started or stopped.
    #[error("embedded cluster at {dir}: {reason}")]
    Cluster {
        /// The cluster's data directory.
        dir: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// An IO error outside the database connection.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(e) => StoreError::Db(e),
            other => StoreError::Pool(other.to_string()),
        }
    }
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io { context: context.into(), source }
    }
}
