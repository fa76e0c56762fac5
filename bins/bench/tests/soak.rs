//! A short `hook-bench soak` on its own embedded cluster: kills and a restart happen, and every
//! consistency check passes. (The long soak is run by hand; see docs/benchmarks.md.)

use std::path::{Path, PathBuf};
use std::process::Command;

/// The soak's data directory, removed when the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_short_soak_with_kills_and_a_restart_passes_every_check() {
    let bench = Path::new(env!("CARGO_BIN_EXE_hook-bench"));
    let processor = bench.with_file_name("hook-processor");
    assert!(
        processor.is_file(),
        "{} is missing: build it first (`cargo build -p hook-processor`, or run the whole workspace's tests)",
        processor.display()
    );
    let scratch = Scratch(std::env::temp_dir().join(format!("hook-bench-soak-test-{}", std::process::id())));
    let output = Command::new(bench)
        .args(["soak", "--minutes", "0.25", "--rate", "300", "--kill-every", "3", "--restarts", "1"])
        .args(["--down-secs", "1", "--processors", "2", "--seed", "7", "--json", "--data-dir"])
        .arg(&scratch.0)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run hook-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "hook-bench soak failed ({})\n{stdout}\n{stderr}", output.status);
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON report");
    let number = |key: &str| report[key].as_u64().unwrap_or_else(|| panic!("{key} in {report:#}"));
    assert_eq!(report["passed"], true, "{report:#}");
    assert!(number("kills") >= 2, "{report:#}");
    assert_eq!(number("restarts"), 1, "{report:#}");
    assert!(number("produced") > 1_000, "{report:#}");
    assert_eq!(number("processed"), number("rows"), "{report:#}");
    assert!(number("rows") >= number("produced"), "{report:#}");
    let checks = report["checks"].as_array().expect("checks");
    assert!(checks.len() >= 14, "{report:#}");
    for check in checks {
        assert_eq!(check["found"], 0, "{check:#}");
    }
}
