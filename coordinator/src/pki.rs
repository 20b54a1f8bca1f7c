//! The consortium's certificate authority, made with rcgen.
//!
//! `coordinator pki init --dir D` writes a CA (`ca.pem`, `ca.key`) and the coordinator's own
//! server bundle; `issue-site NAME` and `issue-admin NAME` write a bundle (`cert.pem`, `key.pem`,
//! `ca.pem`) under `D/sites/NAME` or `D/admins/NAME` for hand-over out of band; `revoke NAME`
//! adds the certificate's fingerprint to `D/revoked.txt`, which the server re-reads when it
//! changes.
//!
//! A client certificate names its holder twice: subject CN = NAME and a SAN URI
//! `fedtune://site/NAME` or `fedtune://admin/NAME`, which is where the coordinator reads the
//! role from ([`crate::identity`]).

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

pub use crate::identity::fingerprint;
use crate::identity::{Role, valid_name};

/// PKI errors; each names the file or name concerned.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} exists already; use another --dir, or delete it to start a new consortium")]
    Exists(PathBuf),
    #[error("no CA in {0}; run `coordinator pki init --dir {0}` first")]
    NoCa(PathBuf),
    #[error(
        "\"{0}\" is not a valid name: use 1 to 63 lowercase letters, digits and '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error(
        "a bundle for {role} \"{name}\" exists at {path}; revoke it first (`coordinator pki revoke`), \
         or pass --force to revoke it and issue a new one"
    )]
    Issued { role: Role, name: String, path: PathBuf },
    #[error("no {role} named \"{name}\" was issued from {dir}")]
    Unknown { role: Role, name: String, dir: PathBuf },
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

pub type PkiResult<T> = Result<T, PkiError>;

/// Lifetime of certificates issued here.
pub const CA_DAYS: i64 = 3650;
pub const LEAF_DAYS: i64 = 365;

fn io<T>(path: &Path, r: std::io::Result<T>) -> PkiResult<T> {
    r.map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

/// Writes `contents` to `path`; keys are readable by the owner only.
fn write(path: &Path, contents: &str, secret: bool) -> PkiResult<()> {
    if let Some(parent) = path.parent() {
        io(parent, fs::create_dir_all(parent))?;
    }
    io(path, fs::write(path, contents))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        io(path, fs::set_permissions(path, fs::Permissions::from_mode(0o600)))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}

fn dn(cn: &str, ou: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fedtune consortium");
    dn.push(DnType::OrganizationalUnitName, ou);
    dn.push(DnType::CommonName, cn);
    dn
}

/// The CA of a PKI directory.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// The folder `init` wrote.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn ca_key_path(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn revocation_list_path(&self) -> PathBuf {
        self.dir.join("revoked.txt")
    }
    pub fn bundle_dir(&self, role: Role, name: &str) -> PathBuf {
        self.dir
            .join(match role {
                Role::Site => "sites",
                Role::Admin => "admins",
            })
            .join(name)
    }
    pub fn server_dir(&self) -> PathBuf {
        self.dir.join("server")
    }

    /// Makes a new CA in `dir` and the coordinator's server bundle for `server_names` (DNS
    /// names or IP addresses the agents will dial).
    pub fn init(dir: &Path, server_names: &[String]) -> PkiResult<Self> {
        let pki = Self { dir: dir.to_owned() };
        if pki.ca_cert_path().exists() {
            return Err(PkiError::Exists(pki.ca_cert_path()));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn("fedtune consortium CA", "ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(CA_DAYS);
        let cert = params.self_signed(&key)?;
        write(&pki.ca_cert_path(), &cert.pem(), false)?;
        write(&pki.ca_key_path(), &key.serialize_pem(), true)?;
        write(&pki.revocation_list_path(), "# sha256 fingerprint, then role/name\n", false)?;
        pki.issue_server(server_names)?;
        Ok(pki)
    }

    pub fn open(dir: &Path) -> PkiResult<Self> {
        let pki = Self { dir: dir.to_owned() };
        if !pki.ca_cert_path().exists() || !pki.ca_key_path().exists() {
            return Err(PkiError::NoCa(dir.to_owned()));
        }
        Ok(pki)
    }

    fn issuer(&self) -> PkiResult<(String, Issuer<'static, KeyPair>)> {
        let ca_pem = io(&self.ca_cert_path(), fs::read_to_string(self.ca_cert_path()))?;
        let key_pem = io(&self.ca_key_path(), fs::read_to_string(self.ca_key_path()))?;
        let key = KeyPair::from_pem(&key_pem)?;
        Ok((ca_pem.clone(), Issuer::from_ca_cert_pem(&ca_pem, key)?))
    }

    fn leaf(&self, out: &Path, params: CertificateParams, days: i64) -> PkiResult<PathBuf> {
        let (ca_pem, issuer) = self.issuer()?;
        let mut params = params;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(days);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write(&out.join("cert.pem"), &cert.pem(), false)?;
        write(&out.join("key.pem"), &key.serialize_pem(), true)?;
        write(&out.join("ca.pem"), &ca_pem, false)?;
        Ok(out.to_owned())
    }

    fn issue_server(&self, names: &[String]) -> PkiResult<PathBuf> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn("fedtune coordinator", "server");
        for n in names {
            params.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into()?),
            });
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.leaf(&self.server_dir(), params, LEAF_DAYS)
    }

    /// Issues a client bundle for a site or an admin, valid for `days`.
    pub fn issue(&self, role: Role, name: &str, days: i64) -> PkiResult<PathBuf> {
        if !valid_name(name) {
            return Err(PkiError::BadName(name.to_owned()));
        }
        let out = self.bundle_dir(role, name);
        if out.join("cert.pem").exists() {
            return Err(PkiError::Issued { role, name: name.to_owned(), path: out });
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(name, role.as_str());
        params.subject_alt_names.push(SanType::URI(role.uri(name).try_into()?));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.leaf(&out, params, days)
    }

    /// Adds the bundle's certificate to the revocation list and removes the bundle's key, so
    /// that a new bundle can be issued under the same name. Returns the fingerprint.
    pub fn revoke(&self, role: Role, name: &str) -> PkiResult<String> {
        let out = self.bundle_dir(role, name);
        let cert = out.join("cert.pem");
        if !cert.exists() {
            return Err(PkiError::Unknown { role, name: name.to_owned(), dir: self.dir.clone() });
        }
        let pem = io(&cert, fs::read_to_string(&cert))?;
        let der = pem_to_der(&pem).ok_or_else(|| PkiError::Io {
            path: cert.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a PEM certificate"),
        })?;
        let fp = fingerprint(&der);
        let list = self.revocation_list_path();
        let mut text = fs::read_to_string(&list).unwrap_or_default();
        text.push_str(&format!("{fp} {}/{name}\n", role.as_str()));
        write(&list, &text, false)?;
        let stamp = OffsetDateTime::now_utc().unix_timestamp();
        // Unique even for two revocations of one name within a second.
        let archived = (0..)
            .map(|n| match n {
                0 => out.with_file_name(format!("{name}.revoked-{stamp}")),
                n => out.with_file_name(format!("{name}.revoked-{stamp}-{n}")),
            })
            .find(|p| !p.exists())
            .expect("an unused name");
        io(&out, fs::rename(&out, &archived))?;
        Ok(fp)
    }
}

/// The DER bytes of the first certificate in a PEM text.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes()).ok().map(|c| c.to_vec())
}
