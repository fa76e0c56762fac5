//! TLS to the database: a server with a certificate from a private CA, reached over TCP with each
//! `sslmode`. The cluster is an embedded one restarted by hand with TCP and TLS turned on.

// Helpers here are test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hook_core::Store;
use hook_store::tokio_postgres::Config;
use hook_store::{ClusterOptions, EmbeddedCluster, PgStore, StoreOptions};

fn run(command: &mut Command) {
    let output = command.output().expect("run a command");
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// A CA and a server certificate for 127.0.0.1 signed by it, written into `dir`.
fn make_certificates(dir: &Path) {
    let path = |name: &str| dir.join(name);
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=hook-events test CA",
        ])
        .arg("-keyout")
        .arg(path("ca.key"))
        .arg("-out")
        .arg(path("ca.crt")));
    run(Command::new("openssl")
        .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1"])
        .arg("-keyout")
        .arg(path("server.key"))
        .arg("-out")
        .arg(path("server.csr")));
    std::fs::write(path("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(path("server.csr"))
        .arg("-CA")
        .arg(path("ca.crt"))
        .arg("-CAkey")
        .arg(path("ca.key"))
        .arg("-extfile")
        .arg(path("ext.cnf"))
        .arg("-out")
        .arg(path("server.crt")));
}

/// Runs `pg_ctl` with `args`, as the `postgres` account when we are root (as the cluster does).
fn pg_ctl(pgdata: &Path, args: &[&str]) {
    let bindir = hook_store::PgBinaries::find().unwrap().bindir;
    let mut command = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bindir.join("pg_ctl"));
        c
    } else {
        Command::new(bindir.join("pg_ctl"))
    };
    run(command.arg("-D").arg(pgdata).args(args).current_dir("/tmp"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct TlsServer {
    dir: PathBuf,
    pgdata: PathBuf,
    port: u16,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        pg_ctl(&self.pgdata, &["stop", "-m", "immediate", "-w"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn tls_server() -> TlsServer {
    let dir = std::env::temp_dir().join(format!("hook-events-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = EmbeddedCluster::start(ClusterOptions {
        data_dir: dir.clone(),
        database: "tls".into(),
        durable: false,
        max_connections: 20,
    })
    .await
    .unwrap();
    cluster.stop_server().await.unwrap();
    let pgdata = dir.join("pgdata");
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certificates(&certs);
    for name in ["server.crt", "server.key"] {
        std::fs::copy(certs.join(name), pgdata.join(name)).unwrap();
    }
    if nix::unistd::geteuid().is_root() {
        let postgres = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        for name in ["server.crt", "server.key"] {
            std::os::unix::fs::chown(
                pgdata.join(name),
                Some(postgres.uid.as_raw()),
                Some(postgres.gid.as_raw()),
            )
            .unwrap();
        }
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(pgdata.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = free_port();
    let options = format!(
        "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories='' -c ssl=on \
         -c ssl_cert_file=server.crt -c ssl_key_file=server.key -c fsync=off"
    );
    pg_ctl(&pgdata, &["start", "-w", "-t", "60", "-l", "/dev/null", "-o", &options]);
    TlsServer { dir, pgdata, port }
}

fn config(server: &TlsServer, sslmode: &str) -> Config {
    format!("host=127.0.0.1 port={} user=postgres dbname=tls sslmode={sslmode}", server.port).parse().unwrap()
}

async fn uses_tls(store: &PgStore) -> bool {
    let client = store.pool().get().await.unwrap();
    client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn sslmode_decides_encryption_and_verification() {
    let server = tls_server().await;
    let ca = server.dir.join("certs/ca.crt");
    let with_ca = StoreOptions { tls_root_cert: Some(ca), ..StoreOptions::default() };

    // require + the private CA: encrypted and verified; the LISTEN connection works over TLS too.
    let store = PgStore::connect(config(&server, "require"), with_ca.clone()).await.expect("verified TLS");
    assert!(uses_tls(&store).await);
    store.migrate().await.unwrap();
    let mut wakeups = store.wakeups().unwrap();
    tokio::time::timeout(Duration::from_secs(10), wakeups.changed()).await.unwrap().unwrap();

    // require without the CA: the certificate cannot be verified, so no connection.
    let error = PgStore::connect(config(&server, "require"), StoreOptions::default()).await.unwrap_err();
    let text = format!("{error:#} {error:?}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    // prefer: encrypted without verification (as libpq).
    let store = PgStore::connect(config(&server, "prefer"), StoreOptions::default()).await.unwrap();
    assert!(uses_tls(&store).await);

    // disable: plain.
    let store = PgStore::connect(config(&server, "disable"), StoreOptions::default()).await.unwrap();
    assert!(!uses_tls(&store).await);

    // A root certificate file that holds no certificate is a clear configuration error.
    let empty = server.dir.join("certs/empty.pem");
    std::fs::write(&empty, "").unwrap();
    let bad = StoreOptions { tls_root_cert: Some(empty), ..StoreOptions::default() };
    let error = PgStore::connect(config(&server, "require"), bad).await.unwrap_err().to_string();
    assert!(error.contains("no PEM certificate"), "{error}");
}
