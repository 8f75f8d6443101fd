//! TLS for SMTP: STARTTLS (RFC 3207) on the plain listeners and implicit TLS (RFC 8314) on the
//! optional `smtp.tls.implicit_listen` listeners.
//!
//! What lives here:
//! - [`TlsConfig`], the `smtp.tls` section, and its validation (pure);
//! - loading the certificate chain and key from PEM files ([`load_certified_key`]) and
//!   [`ServerTls`], the acceptor, whose certificate is swapped on SIGHUP ([`ServerTls::reload`])
//!   without touching sessions in progress: each handshake asks [`ReloadableCert`] for the
//!   current key, and a session keeps what it negotiated;
//! - [`MaybeTls`], the session's stream, plain until it is upgraded;
//! - [`received_clause`], the `(using TLSv1.3 with cipher …)` clause of our `Received:` header.
//!
//! Invariants: TLS 1.2 and 1.3 only, no client certificates, the ring provider. A certificate
//! that does not load never replaces a working one.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ProtocolVersion, ServerConfig, ServerConnection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{Problem, TlsConfig};

/// Why a certificate or key could not be loaded. The message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: no PEM certificate (-----BEGIN CERTIFICATE-----) found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key (PKCS#8, PKCS#1 or SEC1) found")]
    NoKey { path: PathBuf },
    #[error("{path}: not valid PEM: {detail}")]
    BadPem { path: PathBuf, detail: String },
    #[error("{key} does not fit {cert}: {detail}")]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
    #[error("the TLS configuration cannot be built: {0}")]
    Config(#[from] rustls::Error),
}

impl TlsError {
    /// The file the error is about (for a key that does not fit: the key).
    pub fn path(&self) -> Option<&Path> {
        match self {
            TlsError::Read { path, .. }
            | TlsError::NoCertificate { path }
            | TlsError::NoKey { path }
            | TlsError::BadPem { path, .. } => Some(path),
            TlsError::Unusable { key, .. } => Some(key),
            TlsError::Config(_) => None,
        }
    }
}

/// The crypto provider for the SMTP server side: ring, as everywhere in lsmtpd.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn bad_pem(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::BadPem {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Parses a PEM certificate chain (leaf first) and a PEM private key, and checks that the key
/// belongs to the leaf. Pure: the PEM bytes are passed in; the paths only name the files.
pub fn certified_key_from_pem(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(cert_path, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    }
    let key = match PrivateKeyDer::from_pem_slice(key_pem) {
        Ok(key) => key,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey {
                path: key_path.to_path_buf(),
            })
        }
        Err(e) => return Err(bad_pem(key_path, e)),
    };
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Unusable {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        detail: match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                "the private key does not belong to the certificate (the first one in the file)"
                    .to_string()
            }
            other => other.to_string(),
        },
    })
}

/// Reads and checks the configured files. `Ok(None)` when TLS is not configured.
pub fn load_certified_key(cfg: &TlsConfig) -> Result<Option<CertifiedKey>, TlsError> {
    let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) else {
        return Ok(None);
    };
    let cert_pem = read_file(cert)?;
    let key_pem = read_file(key)?;
    certified_key_from_pem(cert, &cert_pem, key, &key_pem).map(Some)
}

/// For `--check-config` and startup: the files load and fit together.
pub fn check_files(cfg: &TlsConfig) -> Result<(), Problem> {
    load_certified_key(cfg).map(|_| ()).map_err(|e| {
        let about_key = e.path().is_some() && e.path() == cfg.key_file.as_deref();
        Problem {
            setting: if about_key {
                "smtp.tls.key_file"
            } else {
                "smtp.tls.cert_file"
            }
            .to_string(),
            message: e.to_string(),
        }
    })
}

/// Hands every new handshake the current certificate; [`ServerTls::reload`] swaps it.
#[derive(Debug)]
pub struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The server side of TLS: the acceptor every session uses, and its reloadable certificate.
pub struct ServerTls {
    config: TlsConfig,
    cert: Arc<ReloadableCert>,
    acceptor: TlsAcceptor,
}

impl ServerTls {
    /// Loads the certificate and builds the rustls configuration (TLS 1.2 and 1.3, no client
    /// certificates). `Ok(None)` when TLS is not configured.
    pub fn load(config: &TlsConfig) -> Result<Option<Arc<ServerTls>>, TlsError> {
        let Some(key) = load_certified_key(config)? else {
            return Ok(None);
        };
        let cert = Arc::new(ReloadableCert {
            current: RwLock::new(Arc::new(key)),
        });
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&cert) as Arc<dyn ResolvesServerCert>);
        Ok(Some(Arc::new(ServerTls {
            config: config.clone(),
            cert,
            acceptor: TlsAcceptor::from(Arc::new(server)),
        })))
    }

    /// Reads the files again and, if they load, serves the new certificate to every handshake
    /// from now on. On error the old certificate stays. Sessions in progress are not affected.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_certified_key(&self.config)?.ok_or_else(|| TlsError::NoCertificate {
            path: PathBuf::new(),
        })?;
        self.cert.replace(key);
        Ok(())
    }

    /// The certificate file (for logs).
    pub fn cert_file(&self) -> Option<&Path> {
        self.config.cert_file.as_deref()
    }

    pub fn handshake_timeout(&self) -> Duration {
        self.config.handshake_timeout
    }

    pub fn required(&self) -> bool {
        self.config.required
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// The Postfix-style clause for our `Received:` header, e.g.
/// `(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384)`.
pub fn received_clause(version: &str, cipher: &str) -> String {
    format!("(using {version} with cipher {cipher})")
}

/// The protocol version and cipher suite a finished handshake negotiated, as text.
pub fn negotiated(conn: &ServerConnection) -> (String, String) {
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_string(),
    };
    let cipher = match conn.negotiated_cipher_suite() {
        Some(cs) => {
            let suite = cs.suite();
            suite
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{suite:?}"))
        }
        None => "unknown".to_string(),
    };
    (version, cipher)
}

/// A session's connection: plain, then possibly upgraded to TLS.
pub enum MaybeTls<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
    /// Only while an upgrade is running (or after it failed): every I/O is an error.
    Upgrading,
}

impl<S> MaybeTls<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Runs the server handshake on a plain stream, within `limit`. On any failure the stream
    /// is left as `Upgrading` (unusable) and the session must end.
    pub async fn upgrade(
        &mut self,
        tls: &ServerTls,
        limit: Duration,
    ) -> io::Result<(String, String)> {
        let plain = match std::mem::replace(self, MaybeTls::Upgrading) {
            MaybeTls::Plain(s) => s,
            other => {
                *self = other;
                return Err(io::Error::other("TLS is already on"));
            }
        };
        let stream = match tokio::time::timeout(limit, tls.acceptor().accept(plain)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ))
            }
        };
        let info = negotiated(stream.get_ref().1);
        *self = MaybeTls::Tls(Box::new(stream));
        Ok(info)
    }
}

fn upgrading_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "connection is being upgraded to TLS",
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading_error())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading_error())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading_error())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MaybeTls::Upgrading => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cert_and_key(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn load(cert: &str, key: &str) -> Result<CertifiedKey, TlsError> {
        certified_key_from_pem(
            Path::new("/etc/c.pem"),
            cert.as_bytes(),
            Path::new("/etc/k.pem"),
            key.as_bytes(),
        )
    }

    #[test]
    fn a_matching_certificate_and_key_load() {
        let (cert, key) = cert_and_key("mx.test");
        let ck = load(&cert, &key).unwrap();
        assert_eq!(ck.cert.len(), 1);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both_files() {
        let (cert, _) = cert_and_key("mx.test");
        let (_, other_key) = cert_and_key("other.test");
        let e = load(&cert, &other_key).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, TlsError::Unusable { .. }), "{e:?}");
        assert!(
            text.contains("/etc/k.pem")
                && text.contains("/etc/c.pem")
                && text.contains("does not belong to the certificate"),
            "{text}"
        );
    }

    #[test]
    fn files_without_pem_items_are_refused_naming_the_file() {
        let (cert, key) = cert_and_key("mx.test");
        let e = load("not a certificate", &key).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");
        assert!(e.to_string().contains("/etc/c.pem"), "{e}");
        let e = load(&cert, &cert).unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e:?}");
        assert_eq!(e.path(), Some(Path::new("/etc/k.pem")));
    }

    #[test]
    fn a_broken_pem_block_is_refused() {
        let (_, key) = cert_and_key("mx.test");
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let e = load(broken, &key).unwrap_err();
        assert!(matches!(e, TlsError::BadPem { .. }), "{e:?}");
    }

    #[test]
    fn a_missing_file_fails_the_check_under_its_setting() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = cert_and_key("mx.test");
        std::fs::write(dir.path().join("c.pem"), cert).unwrap();
        let cfg = TlsConfig {
            cert_file: Some(dir.path().join("c.pem")),
            key_file: Some(dir.path().join("missing.pem")),
            ..TlsConfig::default()
        };
        let p = check_files(&cfg).unwrap_err();
        assert_eq!(p.setting, "smtp.tls.key_file");
        assert!(p.message.contains("missing.pem"), "{p}");
    }

    #[test]
    fn reload_swaps_the_certificate_and_a_bad_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = cert_and_key("one.test");
        let (c2, k2) = cert_and_key("two.test");
        let cp = dir.path().join("c.pem");
        let kp = dir.path().join("k.pem");
        std::fs::write(&cp, &c1).unwrap();
        std::fs::write(&kp, &k1).unwrap();
        let cfg = TlsConfig {
            cert_file: Some(cp.clone()),
            key_file: Some(kp.clone()),
            ..TlsConfig::default()
        };
        let tls = ServerTls::load(&cfg).unwrap().unwrap();
        let first = tls.cert.current().cert[0].clone();
        std::fs::write(&cp, &c2).unwrap();
        // The new certificate with the old key: refused, the first stays.
        assert!(tls.reload().is_err());
        assert_eq!(tls.cert.current().cert[0], first);
        std::fs::write(&kp, &k2).unwrap();
        tls.reload().unwrap();
        assert_ne!(tls.cert.current().cert[0], first);
    }

    #[test]
    fn validation_wants_both_files_and_a_certificate_for_implicit_or_required() {
        let mut problems = Vec::new();
        TlsConfig::default().validate(&[], &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let cfg = TlsConfig {
            cert_file: Some("c.pem".into()),
            ..TlsConfig::default()
        };
        cfg.validate(&[], &mut problems);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].setting, "smtp.tls.key_file");
        problems.clear();
        let cfg = TlsConfig {
            implicit_listen: vec!["127.0.0.1:465".parse().unwrap()],
            required: true,
            ..TlsConfig::default()
        };
        cfg.validate(&[], &mut problems);
        let names: Vec<_> = problems.iter().map(|p| p.setting.as_str()).collect();
        assert_eq!(names, ["smtp.tls.implicit_listen", "smtp.tls.required"]);
    }

    #[test]
    fn the_received_clause_names_version_and_cipher() {
        assert_eq!(
            received_clause("TLSv1.3", "TLS13_AES_256_GCM_SHA384"),
            "(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384)"
        );
    }
}
