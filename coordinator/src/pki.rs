//! The consortium's certificate authority, made with rcgen.
//!
//! `coordinator pki init --dir D` writes a CA (`ca.pem`, `ca.key`), an empty certificate
//! revocation list (`crl.pem`) and the coordinator's own server bundle.
//!
//! In production a party makes its own key and a signing request where it runs
//! (`site-agent init`, `coordinator pki request`), and `sign REQUEST --site NAME` (or
//! `--admin NAME`) writes only the certificate and the CA (`cert.pem`, `ca.pem`) under
//! `D/sites/NAME` or `D/admins/NAME` to send back: private keys never travel. For demos,
//! `issue-site NAME` and `issue-admin NAME` still write a whole bundle with its key.
//!
//! `revoke NAME` adds the certificate's serial number to `crl.pem`, an X.509 CRL signed by the
//! CA, which the server re-reads when it changes: rustls' verifier refuses a revoked
//! certificate at the handshake, and every call checks the serial again.
//!
//! A client certificate names its holder twice: subject CN = NAME and a SAN URI
//! `fedtune://site/NAME` or `fedtune://admin/NAME`, which is where the coordinator reads the
//! role from ([`crate::identity`]).

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub use crate::identity::fingerprint;
use crate::identity::{Role, serial_hex, valid_name};

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
    #[error(
        "the signing request {path} is not one fedtune can sign ({why}); make it with \
         `site-agent init` (sites) or `coordinator pki request` (admins)"
    )]
    BadRequest { path: PathBuf, why: String },
    #[error(
        "the signing request {path} names {named}, not {role} \"{name}\"; check who sent it, \
         and pass the name it was made for"
    )]
    WrongName { path: PathBuf, named: String, role: Role, name: String },
    #[error("{path}: not a certificate revocation list made by this CA ({why})")]
    BadCrl { path: PathBuf, why: String },
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

/// Writes `contents` to `path` through a temporary file and a rename, so that a server
/// re-reading it never sees half a file; keys are readable by the owner only.
fn write(path: &Path, contents: &str, secret: bool) -> PkiResult<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    io(parent, fs::create_dir_all(parent))?;
    let mut tmp = io(parent, tempfile::NamedTempFile::new_in(parent))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        io(path, tmp.as_file().set_permissions(fs::Permissions::from_mode(0o600)))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    io(path, std::io::Write::write_all(&mut tmp, contents.as_bytes()))?;
    io(path, tmp.as_file().sync_all())?;
    tmp.persist(path).map_err(|e| PkiError::Io { path: path.to_owned(), source: e.error })?;
    Ok(())
}

/// A random positive 16-byte serial number (RFC 5280 asks for unpredictable ones; rcgen's
/// default derives it from the public key, which a re-signed request would repeat).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Where a leaf certificate's key comes from.
enum LeafKey<'a> {
    /// Made here and written beside the certificate (demo bundles, the server).
    Generate,
    /// From a signing request: only its public half is here.
    Public(&'a dyn PublicKeyData),
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
    /// The CA's certificate revocation list, PEM.
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("crl.pem")
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
        pki.write_crl(Vec::new(), 1)?;
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

    fn leaf(
        &self,
        out: &Path,
        params: CertificateParams,
        days: i64,
        key: LeafKey<'_>,
    ) -> PkiResult<PathBuf> {
        let (ca_pem, issuer) = self.issuer()?;
        let mut params = params;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(days);
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        // The key first: a server re-reading a rotated pair sees the new key with the old
        // certificate for a moment (refused as a mismatch, so it keeps the old pair), never
        // a new certificate with a key it does not have.
        let cert = match key {
            LeafKey::Generate => {
                let key = KeyPair::generate()?;
                let cert = params.signed_by(&key, &issuer)?;
                write(&out.join("key.pem"), &key.serialize_pem(), true)?;
                cert
            }
            LeafKey::Public(public) => params.signed_by(&public, &issuer)?,
        };
        write(&out.join("ca.pem"), &ca_pem, false)?;
        write(&out.join("cert.pem"), &cert.pem(), false)?;
        Ok(out.to_owned())
    }

    /// Issues the coordinator's server certificate and key for `names` into `D/server`,
    /// replacing what is there: a running server picks the new pair up for new connections.
    pub fn issue_server(&self, names: &[String]) -> PkiResult<PathBuf> {
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
        self.leaf(&self.server_dir(), params, LEAF_DAYS, LeafKey::Generate)
    }

    /// The certificate parameters of a client (site or admin) `name`, refused when `name` is
    /// not valid or a certificate for it is out (`Issued`).
    fn client_params(&self, role: Role, name: &str) -> PkiResult<(PathBuf, CertificateParams)> {
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
        Ok((out, params))
    }

    /// Issues a client bundle (certificate, key and CA) for a site or an admin, valid for
    /// `days`: the demo's way, where the key is made by the CA operator.
    pub fn issue(&self, role: Role, name: &str, days: i64) -> PkiResult<PathBuf> {
        let (out, params) = self.client_params(role, name)?;
        self.leaf(&out, params, days, LeafKey::Generate)
    }

    /// Signs the request in `request` (PEM, from `site-agent init` or `pki request`) for
    /// `role` `name`, valid for `days`: writes `cert.pem` and `ca.pem` (no key) under
    /// [`Self::bundle_dir`] and returns that folder. The request must name the same party (its
    /// common name, and its fedtune URI where it has one); only its public key is taken from
    /// it: role, name, usages and validity are the CA's.
    pub fn sign(&self, request: &Path, role: Role, name: &str, days: i64) -> PkiResult<PathBuf> {
        let pem = io(request, fs::read_to_string(request))?;
        let bad = |why: String| PkiError::BadRequest { path: request.to_owned(), why };
        let csr =
            CertificateSigningRequestParams::from_pem(&pem).map_err(|e| bad(e.to_string()))?;
        let named = requested_identity(&csr.params).map_err(bad)?;
        if named != (role.as_str().to_owned(), name.to_owned()) {
            return Err(PkiError::WrongName {
                path: request.to_owned(),
                named: format!("{} \"{}\"", named.0, named.1),
                role,
                name: name.to_owned(),
            });
        }
        let (out, params) = self.client_params(role, name)?;
        self.leaf(&out, params, days, LeafKey::Public(&csr.public_key))
    }

    /// Adds the certificate of `role` `name` to the CA's revocation list (`crl.pem`, signed
    /// again with the next CRL number) and moves its folder aside, so that a new certificate
    /// can be issued under the same name. Returns the certificate's sha256 fingerprint.
    pub fn revoke(&self, role: Role, name: &str) -> PkiResult<String> {
        let out = self.bundle_dir(role, name);
        let cert = out.join("cert.pem");
        if !cert.exists() {
            return Err(PkiError::Unknown { role, name: name.to_owned(), dir: self.dir.clone() });
        }
        let pem = io(&cert, fs::read_to_string(&cert))?;
        let not_pem = || PkiError::Io {
            path: cert.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a PEM certificate"),
        };
        let der = pem_to_der(&pem).ok_or_else(not_pem)?;
        let serial = {
            use x509_parser::prelude::FromDer;
            let (_, parsed) =
                x509_parser::certificate::X509Certificate::from_der(&der).map_err(|_| not_pem())?;
            parsed.raw_serial().to_vec()
        };
        let (mut entries, number) = self.read_crl()?;
        if !entries.iter().any(|(s, _)| serial_hex(s) == serial_hex(&serial)) {
            entries.push((serial, OffsetDateTime::now_utc()));
        }
        self.write_crl(entries, number + 1)?;
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
        Ok(fingerprint(&der))
    }

    /// The revoked serial numbers (with their revocation time) and the number of the CA's
    /// current CRL; none and 0 where there is no `crl.pem` yet.
    fn read_crl(&self) -> PkiResult<(Vec<Revoked>, u64)> {
        use rustls::pki_types::{CertificateRevocationListDer, pem::PemObject};
        use x509_parser::prelude::FromDer;
        let path = self.crl_path();
        if !path.exists() {
            return Ok((Vec::new(), 0));
        }
        let bad = |why: String| PkiError::BadCrl { path: path.clone(), why };
        let der = CertificateRevocationListDer::from_pem_file(&path)
            .map_err(|e| bad(format!("not PEM: {e}")))?;
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
            .map_err(|e| bad(e.to_string()))?;
        let number = crl
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| bad("no CRL number".into()))?;
        let entries = crl
            .iter_revoked_certificates()
            .map(|r| {
                let when = OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                    .unwrap_or_else(|_| OffsetDateTime::now_utc());
                (r.raw_serial().to_vec(), when)
            })
            .collect();
        Ok((entries, number))
    }

    /// Signs and writes the CA's CRL listing `entries`. It is current for [`CRL_DAYS`]; the
    /// server reads it whatever its next-update date (it is re-signed at every revocation).
    fn write_crl(&self, entries: Vec<Revoked>, number: u64) -> PkiResult<()> {
        let (_, issuer) = self.issuer()?;
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(CRL_DAYS),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: entries
                .into_iter()
                .map(|(serial, when)| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: when,
                    reason_code: Some(RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&issuer)?;
        write(&self.crl_path(), &crl.pem()?, false)
    }
}

/// A CRL entry: a serial number (big-endian bytes) and when it was revoked.
type Revoked = (Vec<u8>, OffsetDateTime);

/// Days a CRL written here is current.
pub const CRL_DAYS: i64 = 365;

/// The (role, name) a signing request asks for: its common name, and the role of its fedtune
/// URI (which, where present, must name the same party). A request without a URI is taken as
/// a site's.
fn requested_identity(params: &CertificateParams) -> Result<(String, String), String> {
    let cn = params
        .distinguished_name
        .get(&DnType::CommonName)
        .and_then(dn_text)
        .ok_or("it has no common name in UTF-8 or printable characters")?;
    let mut role = None;
    for san in &params.subject_alt_names {
        if let SanType::URI(uri) = san
            && let Some(rest) = uri.as_str().strip_prefix("fedtune://")
        {
            let (r, n) = rest.split_once('/').ok_or("its fedtune URI is malformed")?;
            if n != cn {
                return Err(format!("its URI names \"{n}\" but its common name is \"{cn}\""));
            }
            role = Some(r.to_owned());
        }
    }
    Ok((role.unwrap_or_else(|| "site".into()), cn))
}

fn dn_text(v: &rcgen::DnValue) -> Option<String> {
    match v {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The DER bytes of the first certificate in a PEM text.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes()).ok().map(|c| c.to_vec())
}
