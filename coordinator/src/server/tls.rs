//! The server's TLS: its certificate and key, and the client-certificate verifier with the
//! CA's revocation list, each re-read when its files change, so that a rotated server
//! certificate or a revocation takes effect for the next handshake without a restart.
//!
//! - [`ReloadingCert`] serves the pair in `[tls] cert`/`key`. At most once a second per
//!   handshake it looks at the files' modification times; a changed pair is loaded and used
//!   once its key matches its certificate (a pair caught between the two writes is refused as
//!   a mismatch, and the old one stays until the next look). Open connections keep theirs.
//! - [`Explaining`] is webpki's client verifier with the CRL (`[tls] crl`), rebuilt when the
//!   CRL changes; a CRL that does not parse or verify keeps the last good verifier (a
//!   half-copied file must not reinstate anyone). Every refusal is logged in words and counted
//!   by reason.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use super::listener::PEER;
use crate::identity::{self, Role};
use crate::metrics::ServerMetrics;

/// The files of `[tls]`.
#[derive(Clone, Debug)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: Option<PathBuf>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The server's rustls configuration from `files`: its certificate chain and key (reloaded),
/// client certificates required and verified against the client CA and its CRL (reloaded),
/// HTTP/2 by ALPN. Fails, saying which file, when any of them is not usable now.
pub fn server_config(
    files: &TlsPaths,
    metrics: Arc<ServerMetrics>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca = read(&files.client_ca, "client CA")?;
    let crl = match &files.crl {
        Some(p) => Some(read(p, "CRL")?),
        None => None,
    };
    let verifier = verifier(&ca, crl.as_deref(), &provider)?;
    let hints = verifier.root_hint_subjects().to_vec();
    let cert = ReloadingCert::load(&files.cert, &files.key, &provider)?;
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(Explaining {
            ca,
            crl_path: files.crl.clone(),
            provider,
            current: RwLock::new((files.crl.as_deref().and_then(mtime), verifier)),
            hints,
            metrics,
        }))
        .with_cert_resolver(Arc::new(cert));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// webpki's client verifier for `ca_pem`, with the CRLs in `crl_pem` (whose signatures it
/// checks against the CA at each use).
fn verifier(
    ca_pem: &[u8],
    crl_pem: Option<&[u8]>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| format!("client CA: not a PEM certificate ({e})"))?;
        roots.add(cert).map_err(|e| format!("client CA: {e}"))?;
    }
    if roots.is_empty() {
        return Err("client CA: the file holds no certificate".into());
    }
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if let Some(pem) = crl_pem {
        let crls = CertificateRevocationListDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("CRL: not PEM ({e})"))?;
        if crls.is_empty() {
            return Err("CRL: the file holds no revocation list; write one with \
                        `coordinator pki revoke` or remove [tls] crl"
                .into());
        }
        for der in &crls {
            identity::crl_der_serials(der).map_err(|e| format!("CRL: {e}"))?;
        }
        // The CA is the only issuer: only leaf certificates can be revoked.
        builder = builder.with_crls(crls).only_check_end_entity_revocation();
    }
    builder.build().map_err(|e| format!("client CA and CRL: {e}"))
}

/// The server's certificate and key, re-read when their files change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    /// (modification times of cert and key when loaded, the pair, when last looked).
    state: Mutex<(Stamp, Arc<CertifiedKey>, Instant)>,
}

type Stamp = (Option<SystemTime>, Option<SystemTime>);

impl ReloadingCert {
    fn load(cert: &Path, key: &Path, provider: &Arc<CryptoProvider>) -> Result<Self, String> {
        let stamp = (mtime(cert), mtime(key));
        let pair = certified(cert, key, provider)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider: provider.clone(),
            state: Mutex::new((stamp, Arc::new(pair), Instant::now())),
        })
    }
}

/// The pair in `cert` and `key`, refused when the key is not the certificate's.
fn certified(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(&read(cert, "server certificate")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("server certificate {}: not PEM ({e})", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "server certificate {}: the file holds no certificate",
            cert.display()
        ));
    }
    let der = PrivateKeyDer::from_pem_slice(&read(key, "server key")?)
        .map_err(|e| format!("server key {}: not a PEM private key ({e})", key.display()))?;
    CertifiedKey::from_der(chain, der, provider).map_err(|e| {
        format!("server certificate and key ({}, {}): {e}", cert.display(), key.display())
    })
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.2.elapsed() >= Duration::from_secs(1) {
            state.2 = Instant::now();
            let stamp = (mtime(&self.cert), mtime(&self.key));
            if stamp != state.0 {
                match certified(&self.cert, &self.key, &self.provider) {
                    Ok(pair) => {
                        tracing::info!(cert = %self.cert.display(), "server certificate reloaded");
                        *state = (stamp, Arc::new(pair), Instant::now());
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "the server certificate files changed but cannot be used yet; still \
                         serving the previous pair"
                    ),
                }
            }
        }
        Some(state.1.clone())
    }
}

/// The webpki client verifier with the current CRL, and a log line in words (and a count by
/// reason) for each certificate it refuses.
#[derive(Debug)]
struct Explaining {
    ca: Vec<u8>,
    crl_path: Option<PathBuf>,
    provider: Arc<CryptoProvider>,
    /// (the CRL's modification time when read, the verifier built with it).
    current: RwLock<(Option<SystemTime>, Arc<dyn ClientCertVerifier>)>,
    hints: Vec<DistinguishedName>,
    metrics: Arc<ServerMetrics>,
}

impl Explaining {
    /// The verifier for the CRL as it is now on disk.
    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        let Some(path) = &self.crl_path else {
            return self.current.read().unwrap_or_else(|e| e.into_inner()).1.clone();
        };
        let now = mtime(path);
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.0 == now {
                return current.1.clone();
            }
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.0 != now {
            match read(path, "CRL").and_then(|pem| verifier(&self.ca, Some(&pem), &self.provider)) {
                Ok(v) => {
                    tracing::info!(crl = %path.display(), "revocation list reloaded");
                    *current = (now, v);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the CRL changed but cannot be used; keeping the last one read");
                }
            }
        }
        current.1.clone()
    }
}

impl ClientCertVerifier for Explaining {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner().verify_client_cert(end_entity, intermediates, now).inspect_err(|e| {
            let peer = PEER.try_with(|p| p.to_string()).unwrap_or_else(|_| "?".into());
            self.metrics.handshake_refused(refusal_reason(e));
            tracing::warn!(%peer, "{}", explain_refusal(end_entity, e));
        })
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner().supported_verify_schemes()
    }
}

/// The metric label of a refused client certificate.
fn refusal_reason(error: &rustls::Error) -> &'static str {
    match error {
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::Revoked => "revoked",
            _ => "invalid_certificate",
        },
        _ => "other",
    }
}

/// Why a client certificate was refused, who it names and what to do, in one sentence.
pub fn explain_refusal(der: &[u8], error: &rustls::Error) -> String {
    let id = identity::from_der(der).ok();
    let who = match &id {
        Some(id) => format!("the {} certificate of \"{}\"", id.role, id.name),
        None => "a client certificate without a fedtune identity".to_owned(),
    };
    let reissue = match &id {
        Some(id) => {
            let cmd = match id.role {
                Role::Site => "site-agent init` at the site, then `coordinator pki sign",
                Role::Admin => {
                    "coordinator pki request` where you work, then `coordinator pki sign"
                }
            };
            format!("make a new key and request (`{cmd}`) for \"{}\" and install it", id.name)
        }
        None => "make one with `site-agent init` and `coordinator pki sign`".to_owned(),
    };
    let not_after = id.as_ref().map(|i| shared::cert::utc(i.not_after));
    match error {
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!(
            "refused {who}: it expired on {}; {reissue}",
            not_after.unwrap_or_else(|| "an earlier date".into())
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => format!(
            "refused {who}: it is not valid yet; check the clocks of this machine and of the \
             machine that issued it"
        ),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "refused {who}: it was not issued by this consortium's CA (tls.client_ca); {reissue}"
        ),
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            format!("refused {who}: its signature does not verify (damaged or forged); {reissue}")
        }
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => {
            format!("refused {who}: the CA's revocation list (tls.crl) lists it; {reissue}")
        }
        other => format!("refused {who}: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Pki;

    fn der_of(pem_path: &Path) -> Vec<u8> {
        let pem = std::fs::read(pem_path).unwrap();
        CertificateDer::pem_slice_iter(&pem).next().unwrap().unwrap().to_vec()
    }

    #[test]
    fn an_expired_site_certificate_is_explained_with_its_name_date_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), &["localhost".into()]).unwrap();
        let bundle = pki.issue(Role::Site, "site-x", -1).unwrap();
        let der = der_of(&bundle.join("cert.pem"));
        let not_after = identity::from_der(&der).unwrap().not_after;
        let e = rustls::Error::InvalidCertificate(CertificateError::Expired);
        let msg = explain_refusal(&der, &e);
        assert!(msg.contains("site certificate of \"site-x\""), "{msg}");
        assert!(msg.contains(&format!("expired on {}", shared::cert::utc(not_after))), "{msg}");
        assert!(msg.contains("site-agent init"), "{msg}");
        assert_eq!(refusal_reason(&e), "expired");

        let e = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let msg = explain_refusal(&der, &e);
        assert!(msg.contains("not issued by this consortium's CA"), "{msg}");
        assert!(explain_refusal(b"junk", &e).contains("without a fedtune identity"));
        let e = rustls::Error::InvalidCertificate(CertificateError::Revoked);
        assert!(explain_refusal(&der, &e).contains("revocation list"));
        assert_eq!(refusal_reason(&e), "revoked");
    }

    fn paths(dir: &Path) -> TlsPaths {
        TlsPaths {
            cert: dir.join("server/cert.pem"),
            key: dir.join("server/key.pem"),
            client_ca: dir.join("ca.pem"),
            crl: Some(dir.join("crl.pem")),
        }
    }

    #[test]
    fn the_server_config_refuses_files_that_are_not_what_they_should_be() {
        let dir = tempfile::tempdir().unwrap();
        Pki::init(dir.path(), &["localhost".into()]).unwrap();
        let m = Arc::new(ServerMetrics::default());
        assert!(server_config(&paths(dir.path()), m.clone()).is_ok());
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "").unwrap();
        let with = |f: &dyn Fn(&mut TlsPaths)| {
            let mut p = paths(dir.path());
            f(&mut p);
            server_config(&p, m.clone()).unwrap_err()
        };
        let e = with(&|p| p.client_ca = junk.clone());
        assert!(e.contains("client CA"), "{e}");
        let e = with(&|p| p.key = p.cert.clone());
        assert!(e.contains("server key"), "{e}");
        let e = with(&|p| p.cert = junk.clone());
        assert!(e.contains("server certificate"), "{e}");
        let e = with(&|p| p.crl = Some(junk.clone()));
        assert!(e.contains("CRL"), "{e}");
        // Another CA's key with this certificate: a mismatch.
        let other = tempfile::tempdir().unwrap();
        Pki::init(other.path(), &["localhost".into()]).unwrap();
        let e = with(&|p| p.key = other.path().join("server/key.pem"));
        assert!(e.contains("server certificate and key"), "{e}");
    }
}
