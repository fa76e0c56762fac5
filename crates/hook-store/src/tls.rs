//! TLS to the database, chosen by the connection string's `sslmode`.
//!
//! | `sslmode` | what happens |
//! |---|---|
//! | `disable` | no TLS |
//! | `prefer` (the default) | TLS when the server offers it, the certificate not checked (as libpq): protects against eavesdropping, not against an active attacker |
//! | `require` | TLS or no connection, and the server certificate must chain to a trusted root: the system's trust store, plus the PEM file named by `root_cert` (`PGSSLROOTCERT` in the binaries) |
//!
//! `require` verifies the certificate, which is what libpq calls `verify-full`; tokio-postgres
//! knows no `verify-*` modes, and a required TLS connection that any impostor can terminate is
//! not worth requiring. Unix-socket connections never use TLS.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres::Config;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::StoreError;

/// The TLS connector for `config`: see the module docs for what each `sslmode` does.
/// `root_cert` names an extra PEM file of trusted roots (for a private CA).
pub fn make_tls(config: &Config, root_cert: Option<&Path>) -> Result<MakeRustlsConnect, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Config(format!("tls: {e}")))?;
    let client = match config.get_ssl_mode() {
        SslMode::Require => builder.with_root_certificates(trusted_roots(root_cert)?).with_no_client_auth(),
        // Prefer (and Disable, where the connector is never used): encrypt, don't authenticate.
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(client))
}

/// The system's trusted roots plus those in `extra`.
fn trusted_roots(extra: Option<&Path>) -> Result<RootCertStore, StoreError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra {
        let unreadable = |e: &dyn std::fmt::Display| {
            StoreError::Config(format!("tls: root certificate file {}: {e}", path.display()))
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| unreadable(&e))?
            .collect::<Result<_, _>>()
            .map_err(|e| unreadable(&e))?;
        if certs.is_empty() {
            return Err(unreadable(&"no PEM certificate in it"));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| unreadable(&e))?;
        }
    }
    if roots.is_empty() {
        return Err(StoreError::Config(
            "tls: sslmode=require, but no trusted root certificates were found (install the CA into \
             the system trust store or set PGSSLROOTCERT)"
                .into(),
        ));
    }
    Ok(roots)
}

/// Accepts any server certificate but still checks the handshake signatures: `sslmode=prefer`.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
