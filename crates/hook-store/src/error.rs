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

    /// The tables do not fit this build: a column of another type, a missing one, a NOT NULL
    /// column of the user's own without a default (see [`crate::schema`]).
    #[error(transparent)]
    Schema(#[from] crate::schema::SchemaMismatch),

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
    /// Whether this is a [`StoreError::Schema`]: the tables must be fixed before anything can
    /// work; retrying does not help.
    pub fn is_schema_mismatch(&self) -> bool {
        matches!(self, StoreError::Schema(_))
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io { context: context.into(), source }
    }
}
