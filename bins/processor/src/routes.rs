//! `--routes FILE`: the routes file is read and checked before anything else starts (a mistake
//! is a usage error, exit 2, with its line), and its sinks are built once the runtime runs.

use std::path::Path;

use hook_cli::UsageError;
use hook_core::{default_registry, EngineConfig, HandlerRegistry};
use hook_sinks::{LoadOptions, Routes, RoutesError, RoutesFile};
use tracing::{info, warn};

/// Reads and checks the routes file; every mistake is reported, each with its line.
pub(crate) fn load(path: &Path, engine: &EngineConfig) -> anyhow::Result<RoutesFile> {
    let env = |name: &str| std::env::var(name).ok();
    let options = LoadOptions { handler_timeout: engine.handler_timeout, env: &env };
    let file = RoutesFile::load(path, &options).map_err(|error| match error {
        // A file that is there but wrong, or missing: the user's to fix.
        RoutesError::Invalid { .. } | RoutesError::Read { .. } => UsageError(error.to_string()),
    })?;
    Ok(file)
}

/// Builds the sinks and the engine's registry: the routes over the built-in handlers, or the
/// built-in handlers alone without a routes file.
pub(crate) async fn registry(
    file: Option<&RoutesFile>,
    path: Option<&Path>,
) -> anyhow::Result<HandlerRegistry> {
    let (Some(file), Some(path)) = (file, path) else { return Ok(default_registry()) };
    for warning in &file.warnings {
        warn!(file = %path.display(), line = warning.line, "routes file: {}", warning.message);
    }
    let routes = Routes::build(file).await.map_err(|(name, error)| {
        let line = file.sinks.iter().find(|s| s.name == name).map_or(0, |s| s.line);
        UsageError(format!("{}:{line}: sink {name:?}: {error}", path.display()))
    })?;
    let sinks: Vec<String> = routes.sinks().iter().map(|s| format!("{} ({})", s.name(), s.kind())).collect();
    info!(file = %path.display(), routes = file.routes.len(), sinks = %sinks.join(", "), "routes loaded");
    Ok(routes.registry(default_registry()))
}
