//! The commands run on the coordinator's machine beside `serve`: `coordinator doctor` (the
//! server's preflight) and `coordinator restore` (a data dir from a backup).

use std::path::Path;

use anyhow::{Result, bail};

use crate::server::ServerConfig;
use crate::store::{SCHEMA_VERSION, Store, StoreError};

/// Free space in the data dir below which `doctor` fails, and below which it warns.
const DISK_FAIL: u64 = 1 << 30;
const DISK_WARN: u64 = 10 << 30;

fn line(tag: &str, name: &str, detail: &str) {
    println!("{tag}  {name:<12} {detail}");
}

/// `coordinator doctor --config F`: one line per check; an error when any failed.
pub async fn doctor(config: &Path) -> Result<()> {
    let mut failed = 0usize;
    let mut report = |outcome: Result<(bool, String), String>, name: &str| match outcome {
        Ok((true, d)) => line("ok  ", name, &d),
        Ok((false, d)) => line("WARN", name, &d),
        Err(d) => {
            failed += 1;
            line("FAIL", name, &d);
        }
    };
    let cfg = match ServerConfig::load(config) {
        Ok(c) => {
            report(Ok((true, format!("{} reads as version 1", config.display()))), "config");
            c
        }
        Err(e) => {
            report(Err(format!("{e}; fix it, then run doctor again")), "config");
            bail!("the configuration does not load");
        }
    };
    report(certificates(&cfg), "certificates");
    report(crl(&cfg), "crl");
    report(data_dir(&cfg.data_dir), "data dir");
    let (db, in_use) = database(&cfg.data_dir.join("db"));
    report(db, "database");
    for (name, addr) in std::iter::once(("listen", &cfg.listen))
        .chain(cfg.metrics_listen.iter().map(|m| ("metrics", m)))
    {
        let bound = tokio::net::TcpListener::bind(addr.as_str()).await;
        report(
            match bound {
                Ok(_) => Ok((true, format!("{addr} is free to listen on"))),
                Err(e) if in_use && e.kind() == std::io::ErrorKind::AddrInUse => Ok((
                    true,
                    format!("{addr} is in use: by this running coordinator, as its database is"),
                )),
                Err(e) => Err(format!(
                    "{addr}: {e}; another program holds the port, or the address is not this \
                     machine's: change `{name}` in {}",
                    config.display()
                )),
            },
            name,
        );
    }
    if failed > 0 {
        bail!("{failed} checks failed (FAIL lines above say what to do)");
    }
    println!("all checks passed");
    Ok(())
}

/// The server's certificate, key, names and dates, and the client CA.
fn certificates(cfg: &ServerConfig) -> Result<(bool, String), String> {
    let t = &cfg.tls;
    let paths = crate::server::tls::TlsPaths {
        cert: t.cert.clone(),
        key: t.key.clone(),
        client_ca: t.client_ca.clone(),
        crl: None,
    };
    crate::server::tls::server_config(&paths, Default::default())?;
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let (cert, ca) = (read(&t.cert)?, read(&t.client_ca)?);
    shared::cert::check_issued_by(&cert, &ca).map_err(|e| {
        format!(
            "{} was not issued by the client CA {} ({e}): agents holding that CA will refuse \
             it; issue one with `coordinator pki issue-server`",
            t.cert.display(),
            t.client_ca.display()
        )
    })?;
    let fix = "issue a new one with `coordinator pki issue-server --dir PKI` (picked up without a restart)";
    let soon = shared::cert::check_own(&t.cert, "server", fix)?;
    let ca_days = shared::cert::check_own(&t.client_ca, "CA", "make a new consortium CA")?;
    let not_after = shared::cert::Validity::from_pem(&cert).map(|v| v.not_after).unwrap_or(0);
    let mut detail = format!(
        "server certificate and key match, issued by the client CA, valid until {}",
        shared::cert::utc(not_after)
    );
    if let Some(d) = soon {
        detail.push_str(&format!("; only {d} days left: {fix}"));
    }
    if let Some(d) = ca_days {
        detail.push_str(&format!("; the CA itself expires in {d} days"));
    }
    Ok((soon.is_none() && ca_days.is_none(), detail))
}

/// The CRL: present, signed by the CA, how many it lists.
fn crl(cfg: &ServerConfig) -> Result<(bool, String), String> {
    use rustls::pki_types::{CertificateRevocationListDer, pem::PemObject};
    use x509_parser::prelude::FromDer;
    let Some(path) = &cfg.tls.crl else {
        return Ok((false, "no [tls] crl: revoked certificates are refused only by `site revoke`, per site; set it to the PKI's crl.pem".into()));
    };
    let der = CertificateRevocationListDer::from_pem_file(path).map_err(|e| {
        format!("{}: not a PEM CRL ({e}); `coordinator pki revoke` writes it", path.display())
    })?;
    let (_, list) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
        .map_err(|e| format!("{}: unreadable CRL ({e})", path.display()))?;
    let ca_pem = std::fs::read(&cfg.tls.client_ca)
        .map_err(|e| format!("{}: {e}", cfg.tls.client_ca.display()))?;
    let (_, ca) =
        x509_parser::pem::parse_x509_pem(&ca_pem).map_err(|e| format!("client CA: {e}"))?;
    let ca = ca.parse_x509().map_err(|e| format!("client CA: {e}"))?;
    list.verify_signature(ca.public_key()).map_err(|e| {
        format!(
            "{} is not signed by the client CA ({e}): it is another consortium's",
            path.display()
        )
    })?;
    Ok((
        true,
        format!(
            "{} signed by the CA, lists {} revoked certificates",
            path.display(),
            list.iter_revoked_certificates().count()
        ),
    ))
}

/// The data dir: there or creatable, writable, free space.
fn data_dir(dir: &Path) -> Result<(bool, String), String> {
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("."));
    if dir.exists() {
        tempfile::tempfile_in(dir).map_err(|e| {
            format!("{}: cannot write there ({e}); give the service user the folder", dir.display())
        })?;
    }
    let free =
        fs4::available_space(existing).map_err(|e| format!("{}: {e}", existing.display()))?;
    let gib = free as f64 / f64::from(1u32 << 30);
    let made = if dir.exists() { "" } else { " (made at first start)" };
    if free < DISK_FAIL {
        return Err(format!(
            "{}{made}: only {gib:.2} GiB free; models need room: free space or move data_dir",
            dir.display()
        ));
    }
    Ok((
        free >= DISK_WARN,
        format!(
            "{}{made}: {gib:.1} GiB free{}",
            dir.display(),
            if free < DISK_WARN { " (under 10 GiB: a few real-size models)" } else { "" }
        ),
    ))
}

/// The database: absent (new), openable with a known schema, or in use by a running server.
/// The bool says whether it is in use.
fn database(db: &Path) -> (Result<(bool, String), String>, bool) {
    if !db.exists() {
        return (Ok((true, format!("{}: none yet, made at first start", db.display()))), false);
    }
    match Store::open(db) {
        Ok(store) => {
            let counts = store.sites().map(|s| s.len()).unwrap_or(0);
            (
                Ok((
                    true,
                    format!("{}: schema version {SCHEMA_VERSION}, {counts} sites", db.display()),
                )),
                false,
            )
        }
        Err(StoreError::Sled(sled::Error::Io(e)))
            if e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("lock") =>
        {
            (Ok((true, format!("{}: in use by a running coordinator", db.display()))), true)
        }
        Err(e) => (Err(format!("{}: {e}", db.display())), false),
    }
}

/// `coordinator restore ARCHIVE --data-dir DIR`.
pub fn restore(archive: &Path, data_dir: &Path) -> Result<()> {
    let m = crate::backup::restore(archive, data_dir)?;
    let blobs = m.files.iter().filter(|f| f.path.starts_with("blobs/")).count();
    println!(
        "restored {} into {}: the database and {blobs} model blobs, every file's sha256 checked \
         (backup made {} by coordinator {}); point data_dir at it and start `coordinator serve`",
        archive.display(),
        data_dir.display(),
        shared::cert::utc(m.created_unix),
        m.coordinator_version
    );
    Ok(())
}
