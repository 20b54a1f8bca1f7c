//! Who is calling: the role and name in a client certificate, never a request field.

use std::fmt;

use x509_parser::prelude::{FromDer, X509Certificate};

/// The two kinds of client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Site,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Admin => "admin",
        }
    }
    /// The SAN URI that names a holder of this role.
    pub fn uri(self, name: &str) -> String {
        format!("fedtune://{}/{name}", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Site and admin names: 1 to 63 of `[a-z0-9-]`, not starting with '-'.
/// Why `name` is not a valid name of a `what` (site, study), quoting at most its first 40
/// characters (a hostile name can be megabytes long).
pub fn invalid_name(what: &str, name: &str) -> String {
    let shown: String = name.chars().take(40).collect();
    let more = if name.chars().count() > 40 {
        format!("... ({} characters)", name.chars().count())
    } else {
        String::new()
    };
    format!(
        "\"{shown}\"{more} is not a valid {what} name: use 1 to 63 lowercase letters, digits and \
         '-', starting with a letter or digit"
    )
}

pub use shared::cert::valid_name;

/// The verified caller of an RPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub name: String,
    /// sha256 of the certificate (hex).
    pub fingerprint: String,
    /// The certificate's serial number (hex, [`serial_hex`]), as the CRL lists it.
    pub serial: String,
    /// Unix time the certificate expires.
    pub not_after: i64,
}

impl Identity {
    /// `role/name`: what per-identity limits (requests, connections) are counted under.
    pub fn key(&self) -> String {
        format!("{}/{}", self.role, self.name)
    }
}

/// Reads the identity from a client certificate (already verified against the CA by rustls).
pub fn from_der(der: &[u8]) -> Result<Identity, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let (role, name) = shared::cert::identity_in(&cert)?;
    let role = if role == "admin" { Role::Admin } else { Role::Site };
    Ok(Identity {
        role,
        name,
        fingerprint: fingerprint(der),
        serial: serial_hex(cert.raw_serial()),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// A serial number as lowercase hex without leading zero bytes, so that a certificate's and a
/// CRL entry's encodings of one number compare equal.
pub fn serial_hex(raw: &[u8]) -> String {
    let first = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    hex::encode(&raw[first..])
}

/// The serial numbers (as [`serial_hex`]) a PEM CRL lists. The CRL's signature is checked by
/// rustls' verifier at every handshake; this is the per-call check of an identity.
pub fn crl_serials(pem: &[u8]) -> Result<std::collections::HashSet<String>, String> {
    use rustls::pki_types::{CertificateRevocationListDer, pem::PemObject};
    let mut set = std::collections::HashSet::new();
    for der in CertificateRevocationListDer::pem_slice_iter(pem) {
        let der = der.map_err(|e| format!("not a PEM CRL ({e})"))?;
        set.extend(crl_der_serials(&der)?);
    }
    Ok(set)
}

/// The serial numbers one DER CRL lists.
pub fn crl_der_serials(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
        .map_err(|e| format!("unreadable CRL ({e})"))?;
    Ok(crl.iter_revoked_certificates().map(|r| serial_hex(r.raw_serial())).collect())
}

/// sha256 of a DER certificate, hex: how `site revoke` names a certificate.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}
