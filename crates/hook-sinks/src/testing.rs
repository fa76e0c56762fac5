//! Test support (feature `test-support`): a `nats-server -js` of the test's own, the way
//! `hook_store::testing` starts its own PostgreSQL.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where `nats-server` is looked for before `PATH`.
const NATS_SERVER_PATHS: &[&str] =
    &["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"];

/// A `nats-server -js` on a free loopback port with a temporary store directory; killed, and
/// its store removed, on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: std::process::Child,
    /// The client port.
    pub port: u16,
    /// The JetStream store directory.
    pub store_dir: PathBuf,
}

impl NatsServer {
    /// Starts one and waits until JetStream answers.
    ///
    /// # Panics
    /// When `nats-server` is not installed (with what to install), or does not start.
    pub async fn start(tag: &str) -> NatsServer {
        let binary = NATS_SERVER_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .or_else(|| which("nats-server"))
            .unwrap_or_else(|| {
                panic!("nats-server is not installed: install nats-server (apt-get install nats-server)")
            });
        let port = free_port();
        let store_dir =
            std::env::temp_dir().join(format!("hook-sinks-nats-{tag}-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&store_dir);
        std::fs::create_dir_all(&store_dir).unwrap_or_else(|e| panic!("nats store dir: {e}"));
        let child = std::process::Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store_dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let server = NatsServer { child, port, store_dir };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut last;
        loop {
            match async_nats::connect(server.url()).await {
                // JetStream answers its account-info request once it is up (read raw: the
                // client's typed answer expects fields of newer servers).
                Ok(client) => match client.request("$JS.API.INFO", "".into()).await {
                    Ok(reply) if reply.payload.windows(14).any(|w| w == b"account_info_r") => break,
                    Ok(reply) => last = format!("jetstream: {}", String::from_utf8_lossy(&reply.payload)),
                    Err(e) => last = format!("jetstream: {e}"),
                },
                Err(e) => last = e.to_string(),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not start on port {port}: {last}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store_dir);
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.exists())
}

/// A loopback port nothing listens on right now.
///
/// # Panics
/// When no port can be bound at all.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}
