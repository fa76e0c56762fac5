//! HTTPS to a receiver whose certificate comes from a private CA: trusted through `ca_file`,
//! refused (retryable) without it, since the system roots do not know the CA.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{event, Receiver};
use hook_sinks::{Delivery, NamedSink, WebhookConfig, WebhookSink};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A TLS listener for `axum::serve`: handshakes that fail are skipped.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else { continue };
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A CA, and a certificate it signed for `localhost` and 127.0.0.1; the CA's PEM.
fn private_ca() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "hook-events test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key")).expect("ca");
    let server_key = KeyPair::generate().expect("server key");
    let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("server params")
        .signed_by(&server_key, &ca)
        .expect("server cert");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    (ca.pem(), server.der().clone(), key)
}

async fn serve_tls(receiver: &Receiver, cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server config");
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = tcp.local_addr().expect("addr").port();
    let listener = TlsListener { tcp, acceptor: TlsAcceptor::from(Arc::new(config)) };
    let app = receiver.router();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

#[tokio::test]
async fn https_with_a_private_ca_is_trusted_through_ca_file_only() {
    let (ca_pem, cert, key) = private_ca();
    let dir = std::env::temp_dir().join(format!("hook-sinks-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write the CA");
    let receiver = Receiver::default();
    let port = serve_tls(&receiver, cert, key).await;

    let url: hyper::Uri = format!("https://localhost:{port}/ok").parse().expect("url");
    let trusted = WebhookConfig { ca_file: Some(ca_file), ..WebhookConfig::new(url.clone()) };
    let sink = NamedSink::new("tls", WebhookSink::new(trusted).expect("sink"), Duration::from_secs(5));
    let delivery = sink.deliver(event("Stop", "x")).await;
    assert!(delivery.is_delivered(), "{delivery:?}");
    assert_eq!(receiver.requests().len(), 1);

    let untrusted = NamedSink::new(
        "tls",
        WebhookSink::new(WebhookConfig::new(url)).expect("sink"),
        Duration::from_secs(5),
    );
    let delivery = untrusted.deliver(event("Stop", "x")).await;
    let Delivery::Retryable { error, .. } = &delivery else { panic!("{delivery:?}") };
    assert!(error.contains("UnknownIssuer") || error.contains("certificate"), "{error}");
    assert_eq!(receiver.requests().len(), 1, "nothing was sent over the unverified connection");

    let missing = WebhookConfig {
        ca_file: Some(dir.join("absent.pem")),
        ..WebhookConfig::new("https://x/".parse().expect("url"))
    };
    let error = WebhookSink::new(missing).expect_err("an unreadable ca_file fails at build");
    assert!(error.to_string().contains("absent.pem"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}
