//! Where a failed connection to the coordinator broke and what to do, for hospital IT who
//! cannot read the coordinator's log: TCP (nothing listening, no route, DNS), TLS (the
//! coordinator's certificate is not signed by the bundle's CA or does not name the server name;
//! this site's certificate was refused), or the application (the coordinator refused the site).
//!
//! Most causes are in the error's chain of sources. One is not: in TLS 1.3 the coordinator judges
//! the site's certificate after the client has finished its half of the handshake, so its
//! refusal reaches tonic as a closed or broken connection at the first request. For those the
//! agent dials once more with rustls alone and reads the coordinator's alert.

use std::sync::Arc;
use std::time::Duration;

use super::config::SiteConfig;
use super::link::CallError;

impl CallError {
    /// Where a failed connection broke and what to do (TCP, TLS, or the coordinator's answer);
    /// `None` for errors that are not about the connection or show no recognisable cause.
    pub async fn diagnose(&self, cfg: &SiteConfig) -> Option<String> {
        let root: &(dyn std::error::Error + 'static) = match self {
            CallError::Transport(e) => e,
            CallError::Status(s)
                if matches!(
                    s.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ) =>
            {
                return Some(format!(
                    "application: the coordinator at {} accepted the connection but refused this \
                     site: {}",
                    cfg.coordinator.address,
                    s.message()
                ));
            }
            CallError::Status(s) => s,
            _ => return None,
        };
        match diagnose_chain(root, cfg) {
            Some(Found::Sure(d)) => Some(d),
            unsure => match probe_handshake(cfg).await {
                Some(e) => Some(describe_tls(&e, cfg)),
                None => unsure.map(|(Found::Closed(d) | Found::Sure(d))| d),
            },
        }
    }
}

/// A cause found in an error's chain: certain, or a closed connection that may hide the
/// coordinator's refusal of the site's certificate.
enum Found {
    Sure(String),
    Closed(String),
}

/// Walks an error's causes for the first one that tells where the connection broke.
fn diagnose_chain(root: &(dyn std::error::Error + 'static), cfg: &SiteConfig) -> Option<Found> {
    let address = &cfg.coordinator.address;
    let mut cur = Some(root);
    while let Some(e) = cur {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()?.get_ref()?.downcast_ref::<rustls::Error>()
        });
        if let Some(t) = tls {
            return Some(Found::Sure(describe_tls(t, cfg)));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            let text = io.to_string();
            if text.contains("the proxy ") {
                return Some(Found::Sure(format!("proxy: {text}")));
            }
            let hint = match io.kind() {
                K::ConnectionRefused => Some(format!(
                    "TCP: nothing is listening at {address} (connection refused): check \
                     coordinator.address in the site config and that the coordinator runs"
                )),
                K::TimedOut => Some(format!(
                    "TCP: {address} did not answer in time: a firewall may drop the agent's \
                     outbound connection, or the address is wrong"
                )),
                K::HostUnreachable | K::NetworkUnreachable => Some(format!(
                    "TCP: no route to {address} ({text}): check the address and the network"
                )),
                _ if text.contains("lookup address") || text.contains("Name or service") => {
                    Some(format!(
                        "DNS: the host of {address} does not resolve ({text}): check \
                         coordinator.address"
                    ))
                }
                _ if text.contains("received fatal alert") => Some(format!(
                    "TLS: the coordinator refused this site's certificate ({text}): it is \
                     expired, revoked (`coordinator pki revoke`) or from another CA; ask the \
                     study lead, whose `coordinator site list` and log say which, for a new bundle"
                )),
                K::ConnectionReset | K::UnexpectedEof | K::BrokenPipe => {
                    return Some(Found::Closed(format!(
                        "TLS: {address} closed the connection during the handshake ({text}): \
                         the coordinator may have refused this site's certificate (expired, \
                         revoked or from another CA; its log says which), or it is not a \
                         fedtune coordinator"
                    )));
                }
                _ => None,
            };
            if let Some(hint) = hint {
                return Some(Found::Sure(hint));
            }
        }
        cur = e.source();
    }
    None
}

/// A TLS failure in words: whose certificate, what is wrong with it, what to do.
pub(super) fn describe_tls(e: &rustls::Error, cfg: &SiteConfig) -> String {
    use rustls::{AlertDescription as A, CertificateError as C};
    let (address, name) = (&cfg.coordinator.address, &cfg.coordinator.server_name);
    let ca = cfg.tls.bundle.join("ca.pem");
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
            "TLS: the coordinator's certificate at {address} is not signed by the CA in {}: \
             the bundle comes from another consortium's CA, or the coordinator's PKI was made \
             anew; ask the study lead for a new site bundle",
            ca.display()
        ),
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => {
            format!(
                "TLS: the coordinator's certificate at {address} does not name \"{name}\" \
                 (coordinator.server_name in the site config): set it to a name the coordinator \
                 was given at `pki init --server-name`"
            )
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => format!(
            "TLS: the coordinator's certificate at {address} has expired: the study lead must \
             renew it"
        ),
        rustls::Error::InvalidCertificate(other) => {
            format!("TLS: the coordinator's certificate at {address} was refused: {other:?}")
        }
        rustls::Error::AlertReceived(
            a @ (A::BadCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired
            | A::UnsupportedCertificate
            | A::DecryptError
            | A::HandshakeFailure),
        ) => format!(
            "TLS: the coordinator refused this site's certificate ({a:?}): it is expired, \
             revoked (`coordinator pki revoke`) or from another CA; ask the study lead, whose \
             `coordinator site list` and log say which, for a new bundle"
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => format!(
            "TLS: {address} does not answer in TLS ({e}): is it a plain-HTTP port or another \
             service? check coordinator.address"
        ),
        other => format!("TLS: the handshake with {address} failed: {other}"),
    }
}

/// Dials the coordinator with rustls alone, completes the handshake with the site's bundle and
/// waits briefly for the coordinator's verdict on the site's certificate. Sends no application
/// data. Returns the TLS error, if any; `None` when the handshake stands or cannot be tried.
pub(super) async fn probe_handshake(cfg: &SiteConfig) -> Option<rustls::Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;

    let bundle = &cfg.tls.bundle;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(bundle.join("ca.pem")).ok()? {
        roots.add(cert.ok()?).ok()?;
    }
    let chain = CertificateDer::pem_file_iter(bundle.join("cert.pem"))
        .ok()?
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let key = PrivateKeyDer::from_pem_file(bundle.join("key.pem")).ok()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .ok()?;
    config.alpn_protocols = vec![b"h2".to_vec()];

    let uri: tonic::codegen::http::Uri = cfg.coordinator.address.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(443);
    let name = ServerName::try_from(cfg.coordinator.server_name.clone()).ok()?;
    let tls_error = |e: std::io::Error| e.get_ref()?.downcast_ref::<rustls::Error>().cloned();
    let attempt = async {
        let tcp = super::proxy::dial(&cfg.route().ok()?, &host, port).await.ok()?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let mut tls = match connector.connect(name, tcp).await {
            Ok(tls) => tls,
            Err(e) => return tls_error(e),
        };
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(3), tls.read(&mut byte)).await {
            Ok(Err(e)) => tls_error(e),
            _ => None,
        }
    };
    tracing::debug!("dialling the coordinator once more to read its verdict on the handshake");
    tokio::time::timeout(Duration::from_secs(10), attempt).await.ok().flatten()
}
