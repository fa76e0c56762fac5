//! The error types of this crate.

/// A configuration value that the engine refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `max_retry_count` is out of range.
    #[error(
        "max retry count {0} is out of range: it must be between 1 and 10 \
         (the hook_events table's CHECK caps retry_count at 10)"
    )]
    MaxRetryCount(u32),
    /// The batch size is out of range.
    #[error("batch size {0} is out of range: it must be between 1 and 10000")]
    BatchSize(usize),
    /// Any other invalid value.
    #[error("{0}")]
    Invalid(String),
}
