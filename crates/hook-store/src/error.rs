//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong in `hook-store`.
///
/// Messages are lowercase, without a trailing period, and never contain a password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A query or connection failed. Shown as one line that says it all (the server's
    /// `SEVERITY: message`, or the driver's error with its cause), so the driver's error is not
    /// exposed as a separate `source` that a printed chain would repeat.
    #[error("{}", describe_db_error(.0))]
    Db(tokio_postgres::Error),

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

    /// The database did not answer a call within its deadline ([`StoreOptions::call_timeout`]):
    /// the network or the server went silent. The call's connection has been closed; whether a
    /// statement already sent (a `COMMIT`) took effect is unknown.
    ///
    /// [`StoreOptions::call_timeout`]: crate::StoreOptions::call_timeout
    #[error("{what}: no answer from the database within {}s", after.as_secs_f64())]
    Timeout {
        /// The call: `claim`, `keep-alive`, `recording outcomes`, `LISTEN`, ...
        what: &'static str,
        /// The deadline that passed.
        after: std::time::Duration,
    },

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

    /// An index of [`crate::indexes`] could not be built; it is left missing, and the next
    /// [`crate::indexes::ensure`] tries again.
    #[error("building index {name}: {reason}")]
    IndexBuild {
        /// The index's name.
        name: &'static str,
        /// What went wrong (the server's error).
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

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        StoreError::Db(error)
    }
}

/// One line for a driver error, without repeating itself: the server's `SEVERITY: message`
/// (plus its hint; never its `DETAIL`, which can quote row data), or the driver's words and their
/// causes. "error connecting to server" is dropped in front of its cause ("Connection refused
/// (os error 111)"), since the binaries already say what they were connecting to.
pub(crate) fn describe_db_error(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{}: {}", db.severity(), db.message());
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" (hint: {hint})"));
        }
        return one_line(&text);
    }
    let own = error.to_string();
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !causes.contains(&shown) && shown != own {
            causes.push(shown);
        }
        source = cause.source();
    }
    let text = match (own.as_str(), causes.as_slice()) {
        ("error connecting to server", [_, ..]) => causes.join(": "),
        ("invalid configuration", [only]) if only == "password missing" => {
            "the server asks for a password and none was given (in the URL, DB_PASSWORD, \
             POSTGRES_PASSWORD, PGPASSWORD or the password file ~/.pgpass)"
                .to_owned()
        }
        (_, []) => own,
        _ => format!("{own}: {}", causes.join(": ")),
    };
    one_line(&text)
}

fn one_line(text: &str) -> String {
    text.split(['\n', '\r']).map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(e) => StoreError::Db(e),
            // The pool's create and recycle timeouts are `StoreOptions::call_timeout`.
            deadpool_postgres::PoolError::Timeout(
                deadpool_postgres::TimeoutType::Create | deadpool_postgres::TimeoutType::Recycle,
            ) => StoreError::Pool("connect: no answer from the database within the call timeout".into()),
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
