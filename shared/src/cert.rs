//! Certificate validity, read ahead of time so that an expiring or expired certificate is
//! reported in words before a TLS handshake fails without them.

use std::path::Path;

/// When the first certificate of a PEM file is valid, in Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// Where a certificate stands at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Valid for this many more whole days.
    Valid { days_left: i64 },
    /// Expired this many whole days ago (0: within the last day).
    Expired { days_ago: i64 },
    /// Not valid before `not_before` (usually this machine's clock is wrong).
    NotYetValid,
}

impl Validity {
    /// Reads the first certificate of `pem`.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let (_, block) = x509_parser::pem::parse_x509_pem(pem)
            .map_err(|e| format!("not a PEM certificate ({e})"))?;
        let cert = block.parse_x509().map_err(|e| format!("unreadable certificate ({e})"))?;
        let v = cert.validity();
        Ok(Self { not_before: v.not_before.timestamp(), not_after: v.not_after.timestamp() })
    }

    /// Reads the certificate in `path`.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn standing(&self, now_unix: i64) -> Standing {
        if now_unix < self.not_before {
            Standing::NotYetValid
        } else if now_unix > self.not_after {
            Standing::Expired { days_ago: (now_unix - self.not_after) / 86_400 }
        } else {
            Standing::Valid { days_left: (self.not_after - now_unix) / 86_400 }
        }
    }
}

/// Days before expiry from which a party warns about its own certificate.
pub const WARN_DAYS: i64 = 30;

/// A party's own certificate, checked before it dials or serves: `Err` with the message when it
/// cannot be read, has expired or is not yet valid (`fix` says what to do), `Ok(Some(days))`
/// when it expires within [`WARN_DAYS`], `Ok(None)` otherwise. `role` names it ("site",
/// "server").
pub fn check_own(path: &Path, role: &str, fix: &str) -> Result<Option<i64>, String> {
    let v = Validity::from_file(path)
        .map_err(|e| format!("the {role} certificate cannot be read: {e}; {fix}"))?;
    match v.standing(now_unix()) {
        Standing::Expired { days_ago } => Err(format!(
            "the {role} certificate {} expired on {} ({days_ago} days ago) and will be \
             refused; {fix}",
            path.display(),
            utc(v.not_after)
        )),
        Standing::NotYetValid => Err(format!(
            "the {role} certificate {} is not valid before {}; check this machine's clock",
            path.display(),
            utc(v.not_before)
        )),
        Standing::Valid { days_left } if days_left < WARN_DAYS => Ok(Some(days_left)),
        Standing::Valid { .. } => Ok(None),
    }
}

/// Whether `name` can name a site or an admin: 1 to 63 lowercase letters, digits and '-',
/// not starting with '-'.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A new private key and a certificate signing request for `role` ("site" or "admin") `name`:
/// subject CN = name and the SAN URI `fedtune://ROLE/NAME` the coordinator reads identities
/// from. Returns (key PEM, request PEM). The key never leaves the machine that calls this; the
/// CA signs the request (`coordinator pki sign`).
pub fn signing_request(role: &str, name: &str) -> Result<(String, String), String> {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
    let e = |e: rcgen::Error| format!("making the signing request: {e}");
    let key = KeyPair::generate().map_err(e)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fedtune consortium");
    dn.push(DnType::OrganizationalUnitName, role);
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let uri = format!("fedtune://{role}/{name}");
    params.subject_alt_names.push(SanType::URI(uri.try_into().map_err(e)?));
    let csr = params.serialize_request(&key).map_err(e)?;
    Ok((key.serialize_pem(), csr.pem().map_err(e)?))
}

/// Makes a key and a signing request for `role` `name` ([`signing_request`]) and writes them
/// to `dir/key.pem` (owner-only) and `dir/request.csr`. Refuses to replace a key already
/// there. Returns the two paths.
pub fn write_request(
    dir: &Path,
    role: &str,
    name: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
    if !valid_name(name) {
        return Err(format!(
            "\"{name}\" is not a valid {role} name: use 1 to 63 lowercase letters, digits and \
             '-', starting with a letter or digit"
        ));
    }
    let (key_path, csr_path) = (dir.join("key.pem"), dir.join("request.csr"));
    if key_path.exists() {
        return Err(format!(
            "{} exists already: this folder holds a key. Use another --out, or delete the old \
             key if you mean to replace it (its certificate must then be signed again)",
            key_path.display()
        ));
    }
    let (key, csr) = signing_request(role, name)?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    std::io::Write::write_all(&mut f, key.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    std::fs::write(&csr_path, csr).map_err(|e| format!("{}: {e}", csr_path.display()))?;
    Ok((key_path, csr_path))
}

/// The fedtune identity (role, name) a certificate carries in its SAN URI
/// `fedtune://site/NAME` or `fedtune://admin/NAME`: exactly one, of a known role, with a
/// valid name ([`valid_name`]). The coordinator reads every caller's identity with it.
pub fn identity_in(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<(String, String), String> {
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let mut found = None;
    for san in sans {
        if let x509_parser::extensions::GeneralName::URI(uri) = san
            && let Some(rest) = uri.strip_prefix("fedtune://")
        {
            let (role, name) = rest.split_once('/').ok_or("malformed fedtune URI")?;
            if !matches!(role, "site" | "admin") {
                return Err(format!("unknown role \"{role}\" in certificate"));
            }
            if !valid_name(name) {
                return Err(format!("invalid name \"{name}\" in certificate"));
            }
            if found.replace((role.to_owned(), name.to_owned())).is_some() {
                return Err("certificate names more than one fedtune identity".into());
            }
        }
    }
    found.ok_or_else(|| {
        "certificate has no fedtune://site/NAME or fedtune://admin/NAME name".to_owned()
    })
}

/// [`identity_in`] of the first certificate of a PEM text.
pub fn identity_of(cert_pem: &[u8]) -> Result<(String, String), String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(cert_pem)
        .map_err(|e| format!("not a PEM certificate ({e})"))?;
    let cert = block.parse_x509().map_err(|e| format!("unreadable certificate ({e})"))?;
    identity_in(&cert)
}

/// Whether the first certificate of `cert_pem` was issued and signed by the first of
/// `ca_pem`: `Err` says what does not match.
pub fn check_issued_by(cert_pem: &[u8], ca_pem: &[u8]) -> Result<(), String> {
    let (_, cert) = x509_parser::pem::parse_x509_pem(cert_pem)
        .map_err(|e| format!("the certificate is not PEM ({e})"))?;
    let cert = cert.parse_x509().map_err(|e| format!("unreadable certificate ({e})"))?;
    let (_, ca) =
        x509_parser::pem::parse_x509_pem(ca_pem).map_err(|e| format!("the CA is not PEM ({e})"))?;
    let ca = ca.parse_x509().map_err(|e| format!("unreadable CA certificate ({e})"))?;
    if cert.issuer() != ca.subject() {
        return Err(format!(
            "the certificate was issued by \"{}\", and this CA is \"{}\"",
            cert.issuer(),
            ca.subject()
        ));
    }
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|e| format!("its signature does not verify with this CA's key ({e})"))
}

/// Now, in Unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A date as `YYYY-MM-DD HH:MM UTC`.
pub fn utc(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => format!("{unix} (Unix seconds)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_standing() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_795_755_444), "2026-11-27 04:57 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
        let v = Validity { not_before: 100, not_after: 100 + 3 * 86_400 + 5 };
        assert_eq!(v.standing(50), Standing::NotYetValid);
        assert_eq!(v.standing(100), Standing::Valid { days_left: 3 });
        assert_eq!(v.standing(100 + 3 * 86_400 + 6), Standing::Expired { days_ago: 0 });
        assert_eq!(v.standing(100 + 5 * 86_400 + 6), Standing::Expired { days_ago: 2 });
        assert!(Validity::from_pem(b"not a certificate").is_err());
    }
}
