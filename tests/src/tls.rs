//! TLS helpers for the end-to-end tests: a throw-away CA that issues server certificates
//! (rcgen), PEM files in the test's directory, and a client side (tokio-rustls, ring) that trusts
//! only that CA.
//!
//! ```ignore
//! let ca = TestCa::new()?;
//! let (cert, key) = ca.issue(&["mx.test", "127.0.0.1"])?.write_to(dir, "server")?;
//! let d = Lsmtpd::start(dir, &test_config(dir, &tls_smtp_extra(&cert, &key, ""), None), &[])?;
//! let (c, _greeting) = RawClient::connect(d.addr).await?;
//! c.cmd("EHLO client.test").await?;
//! let (mut c, session) = starttls(c, &ca.connector()?, "mx.test").await?;
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::{ClientStream, RawClient, SmtpReply};

/// A certificate authority that exists only for one test.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    cert: rcgen::Certificate,
}

/// A server certificate issued by a [`TestCa`], with its private key.
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

/// What a client saw of a finished handshake.
#[derive(Debug, Clone)]
pub struct TlsSession {
    /// The leaf certificate the server presented.
    pub leaf: CertificateDer<'static>,
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    /// The cipher suite, in rustls's names (e.g. `TLS13_AES_256_GCM_SHA384`).
    pub cipher: String,
}

impl TestCa {
    pub fn new() -> Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "lsmtpd test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(TestCa { params, key, cert })
    }

    /// The CA certificate in PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// Writes the CA certificate as PEM (for clients such as Python or lsmtp-bench `--ca`).
    pub fn write_pem(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.pem()).with_context(|| format!("write {}", path.display()))
    }

    /// Issues a server certificate for `names` (DNS names; IP addresses become IP SANs).
    pub fn issue(&self, names: &[&str]) -> Result<ServerCert> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        })
    }

    /// A client connector that trusts this CA only (TLS 1.2 and 1.3, ring). Session
    /// resumption is off, so every connection runs a full handshake and sees the certificate
    /// the server serves now (a resumed session reports the one of its first handshake).
    pub fn connector(&self) -> Result<TlsConnector> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der())?;
        client_connector(roots)
    }
}

/// A client connector trusting the CA certificate(s) in a PEM file (e.g. for lsmtp-bench);
/// no session resumption, like [`TestCa::connector`].
pub fn connector_trusting(ca_file: &Path) -> Result<TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("cannot read {}", ca_file.display()))?
    {
        roots.add(cert.with_context(|| format!("{}: bad PEM", ca_file.display()))?)?;
    }
    if roots.is_empty() {
        bail!("{}: no certificate found", ca_file.display());
    }
    client_connector(roots)
}

/// A ring-based client trusting `roots` only, without session resumption: every handshake is a
/// full one and reports the certificate the server serves now.
fn client_connector(roots: rustls::RootCertStore) -> Result<TlsConnector> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

impl ServerCert {
    /// Writes `<stem>.crt` (the chain: leaf only) and `<stem>.key` into `dir`.
    pub fn write_to(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        self.write(&cert, &key)?;
        Ok((cert, key))
    }

    /// Writes the certificate and the key to the given paths (replacing them).
    pub fn write(&self, cert: &Path, key: &Path) -> Result<()> {
        std::fs::write(cert, &self.cert_pem)
            .with_context(|| format!("write {}", cert.display()))?;
        std::fs::write(key, &self.key_pem).with_context(|| format!("write {}", key.display()))?;
        Ok(())
    }
}

/// The `smtp:` fragment for [`crate::test_config`] that turns TLS on with these files;
/// `extra` goes inside the `tls:` section (e.g. `"required: true,"`).
pub fn tls_smtp_extra(cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        "tls: (cert_file: Some({:?}), key_file: Some({:?}), {extra}),",
        cert.display().to_string(),
        key.display().to_string()
    )
}

/// Runs the client handshake on `stream` and wraps the TLS stream in a new [`RawClient`].
pub async fn handshake(
    stream: Box<dyn ClientStream>,
    connector: &TlsConnector,
    server_name: &str,
) -> Result<(RawClient, TlsSession)> {
    let name = ServerName::try_from(server_name.to_string())?;
    let tls = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        connector.connect(name, stream),
    )
    .await
    .context("no TLS handshake within 30 s")??;
    let conn = tls.get_ref().1;
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .context("the server presented no certificate")?;
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        other => format!("{other:?}"),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("unknown")
        .to_string();
    Ok((
        RawClient::over(tls),
        TlsSession {
            leaf,
            version,
            cipher,
        },
    ))
}

/// Sends STARTTLS, expects `220`, and upgrades the connection. The caller must EHLO again.
pub async fn starttls(
    mut client: RawClient,
    connector: &TlsConnector,
    server_name: &str,
) -> Result<(RawClient, TlsSession)> {
    let reply = client.cmd("STARTTLS").await?;
    if reply.code != 220 {
        bail!("STARTTLS refused: {reply:?}");
    }
    handshake(client.into_stream()?, connector, server_name).await
}

/// Connects to an implicit-TLS listener: handshake first, then reads the greeting.
pub async fn connect_implicit(
    addr: SocketAddr,
    connector: &TlsConnector,
    server_name: &str,
) -> Result<(RawClient, SmtpReply, TlsSession)> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut client, session) = handshake(Box::new(tcp), connector, server_name).await?;
    let greeting = client.reply().await?;
    Ok((client, greeting, session))
}

/// The implicit-TLS address the daemon logged (`listening_implicit_tls addr=…`).
pub fn implicit_tls_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .rev()
        .find_map(|l| crate::parse_event_addr(l, "listening_implicit_tls"))
}

/// Waits (up to 30 s) until the daemon's log holds `needle` at least `times` times.
pub fn wait_for_log(daemon: &crate::Lsmtpd, needle: &str, times: usize) -> Result<()> {
    daemon.wait_for_log_times(needle, times, std::time::Duration::from_secs(30))
}
