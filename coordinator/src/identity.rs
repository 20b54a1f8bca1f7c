//! Who is calling: the role and name in a client certificate, never a request field.

use std::fmt;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

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

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The verified caller of an RPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub name: String,
    /// sha256 of the certificate (hex), as in the revocation list.
    pub fingerprint: String,
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
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let mut found = None;
    for san in sans {
        if let GeneralName::URI(uri) = san
            && let Some(rest) = uri.strip_prefix("fedtune://")
        {
            let (role, name) = rest.split_once('/').ok_or("malformed fedtune URI")?;
            let role = match role {
                "site" => Role::Site,
                "admin" => Role::Admin,
                other => return Err(format!("unknown role \"{other}\" in certificate")),
            };
            if !valid_name(name) {
                return Err(format!("invalid name \"{name}\" in certificate"));
            }
            if found.replace((role, name.to_owned())).is_some() {
                return Err("certificate names more than one fedtune identity".into());
            }
        }
    }
    let (role, name) =
        found.ok_or("certificate has no fedtune://site/NAME or fedtune://admin/NAME name")?;
    Ok(Identity {
        role,
        name,
        fingerprint: fingerprint(der),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// sha256 of a DER certificate, hex: how revocations name a certificate.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}
