//! A TCP proxy on loopback between a client under test and the test server that can go silent
//! (feature `test-support`; see [`SilentProxy`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_postgres::config::Host;
use tokio_postgres::Config;

/// A TCP proxy on `127.0.0.1` to a PostgreSQL server that can stop forwarding at any moment, as
/// a network does when a NAT entry is dropped, a VIP fails over or a VM is paused: while
/// [frozen](Self::freeze), nothing is read or written on any connection, in either direction,
/// and new connections are accepted but not connected onward; no socket is closed and nothing is
/// reset. The kernel still acknowledges what the client sends (into the proxy's receive buffer),
/// so TCP keepalives and `tcp_user_timeout` see a healthy peer: only the client's own deadlines
/// can notice. [`thaw`](Self::thaw) resumes every connection where it stopped.
///
/// Dropping the proxy closes every connection.
pub struct SilentProxy {
    addr: SocketAddr,
    frozen: watch::Sender<bool>,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// Where the proxy connects to.
#[derive(Clone)]
enum Upstream {
    Tcp(String, u16),
    Unix(std::path::PathBuf),
}

/// Either kind of upstream stream.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl SilentProxy {
    /// Starts a proxy to the server `upstream` points at (its first host, TCP or Unix socket).
    ///
    /// # Panics
    /// When `upstream` names no host or the loopback port cannot be bound.
    pub async fn start(upstream: &Config) -> SilentProxy {
        let port = upstream.get_ports().first().copied().unwrap_or(5432);
        let target = match upstream.get_hosts().first() {
            Some(Host::Tcp(host)) => Upstream::Tcp(host.clone(), port),
            Some(Host::Unix(dir)) => Upstream::Unix(dir.join(format!(".s.PGSQL.{port}"))),
            None => panic!("SilentProxy: the upstream configuration names no host"),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("SilentProxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("SilentProxy: local address");
        let (frozen, _) = watch::channel(false);
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(accept_loop(listener, target, frozen.subscribe(), Arc::clone(&accepted)));
        SilentProxy { addr, frozen, accepted, task }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `base` (user, database, password, other settings) pointed at the proxy instead.
    pub fn config(&self, base: &Config) -> Config {
        let mut config = Config::new();
        config.host(self.addr.ip().to_string()).port(self.addr.port());
        if let Some(user) = base.get_user() {
            config.user(user);
        }
        if let Some(dbname) = base.get_dbname() {
            config.dbname(dbname);
        }
        if let Some(password) = base.get_password() {
            config.password(password);
        }
        if let Some(name) = base.get_application_name() {
            config.application_name(name);
        }
        config
    }

    /// Stops forwarding, on every connection, in both directions.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Resumes forwarding where it stopped.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        // The accept task owns the connections' tasks: aborting it drops them all.
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: Upstream,
    frozen: watch::Receiver<bool>,
    accepted: Arc<AtomicUsize>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            client = listener.accept() => {
                let Ok((client, _)) = client else { continue };
                accepted.fetch_add(1, Ordering::Relaxed);
                connections.spawn(forward(client, target.clone(), frozen.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One client connection: connects onward once not frozen, then copies both ways.
async fn forward(client: TcpStream, target: Upstream, mut frozen: watch::Receiver<bool>) {
    if thawed(&mut frozen).await.is_err() {
        return;
    }
    let server: Box<dyn Stream> = match &target {
        Upstream::Tcp(host, port) => match TcpStream::connect((host.as_str(), *port)).await {
            Ok(stream) => Box::new(stream),
            Err(_) => return,
        },
        Upstream::Unix(path) => match UnixStream::connect(path).await {
            Ok(stream) => Box::new(stream),
            Err(_) => return,
        },
    };
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    // Either direction ending (EOF or an error) ends both, as closing a real connection does.
    tokio::select! {
        () = copy(client_read, server_write, frozen.clone()) => {}
        () = copy(server_read, client_write, frozen) => {}
    }
}

/// Copies `from` into `to`, reading and writing only while not frozen; on EOF, shuts `to` down.
async fn copy(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buffer = vec![0_u8; 16 * 1024];
    loop {
        if thawed(&mut frozen).await.is_err() {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            // Frozen while waiting to read: stop reading.
            changed = frozen.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let mut written = 0;
        while written < n {
            if thawed(&mut frozen).await.is_err() {
                return;
            }
            tokio::select! {
                write = to.write(&buffer[written..n]) => match write {
                    Ok(0) | Err(_) => return,
                    Ok(w) => written += w,
                },
                changed = frozen.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Waits until the proxy is not frozen; `Err` once the proxy is gone.
async fn thawed(frozen: &mut watch::Receiver<bool>) -> Result<(), watch::error::RecvError> {
    frozen.wait_for(|frozen| !frozen).await.map(drop)
}
