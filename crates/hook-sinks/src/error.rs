//! The crate's errors.

use std::fmt;
use std::path::PathBuf;

/// A sink could not be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A setting is wrong or cannot be used (an unreadable CA file, an empty secret, ...).
    #[error("{0}")]
    Config(String),
}

/// One mistake in a routes file, at a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line of the file.
    pub line: usize,
    /// What is wrong, and usually how to fix it.
    pub message: String,
}

/// Why a routes file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    /// The file cannot be read.
    #[error("reading the routes file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file has mistakes: every one found, each with its line.
    #[error("{}", Problems { path, problems })]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The mistakes, in the order of the file.
        problems: Vec<Problem>,
    },
}

impl RoutesError {
    /// The mistakes found (empty for [`RoutesError::Read`]).
    pub fn problems(&self) -> &[Problem] {
        match self {
            RoutesError::Read { .. } => &[],
            RoutesError::Invalid { problems, .. } => problems,
        }
    }
}

struct Problems<'a> {
    path: &'a PathBuf,
    problems: &'a [Problem],
}

impl fmt::Display for Problems<'_> {
    /// One line per mistake: `routes.toml:12: unknown sink "slak"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}:{}: {}", self.path.display(), problem.line, problem.message)?;
        }
        Ok(())
    }
}
