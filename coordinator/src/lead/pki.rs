//! `coordinator pki`: the consortium CA's commands, run where the CA's files are.

use std::path::PathBuf;

use anyhow::Result;

use super::{PkiCommand, out};
use crate::identity::Role;
use crate::pki::Pki;

/// Issues a bundle; with `force`, an existing one's certificate is revoked first.
fn issue(dir: &std::path::Path, role: Role, name: &str, days: i64, force: bool) -> Result<PathBuf> {
    let pki = Pki::open(dir)?;
    if force && pki.bundle_dir(role, name).join("cert.pem").exists() {
        let fp = pki.revoke(role, name)?;
        out(&format!(
            "revoked the previous {role} certificate of {name} (sha256 {fp}); listed in {}",
            pki.crl_path().display()
        ));
    }
    Ok(pki.issue(role, name, days)?)
}

/// Runs a `coordinator pki` command.
pub(super) fn run(p: PkiCommand) -> Result<()> {
    match p {
        PkiCommand::Init { dir, server_names } => {
            let pki = Pki::init(&dir, &server_names)?;
            out(&format!("CA: {}", pki.ca_cert_path().display()));
            out(&format!(
                "server bundle ({}): {}",
                server_names.join(", "),
                pki.server_dir().display()
            ));
            out("keep ca.key offline when you can; it signs every bundle");
        }
        PkiCommand::IssueSite { name, dir, days, force } => {
            let path = issue(&dir, Role::Site, &name, days, force)?;
            out(&format!(
                "site bundle for {name}: {} (hand it to the site's IT out of band)",
                path.display()
            ));
        }
        PkiCommand::IssueAdmin { name, dir, days, force } => {
            let path = issue(&dir, Role::Admin, &name, days, force)?;
            out(&format!("admin bundle for {name}: {}", path.display()));
        }
        PkiCommand::Revoke { name, dir, admin } => {
            let role = if admin { Role::Admin } else { Role::Site };
            let pki = Pki::open(&dir)?;
            let fp = pki.revoke(role, &name)?;
            out(&format!(
                "revoked {role} {name} (certificate sha256 {fp}); listed in {}",
                pki.crl_path().display()
            ));
        }
        PkiCommand::Sign { request, site, admin, dir, days, force } => {
            let (role, name) = match (site, admin) {
                (Some(n), _) => (Role::Site, n),
                (None, Some(n)) => (Role::Admin, n),
                (None, None) => anyhow::bail!("pass --site NAME or --admin NAME"),
            };
            let pki = Pki::open(&dir)?;
            if force && pki.bundle_dir(role, &name).join("cert.pem").exists() {
                let fp = pki.revoke(role, &name)?;
                out(&format!("revoked the previous {role} certificate of {name} (sha256 {fp})"));
            }
            let path = pki.sign(&request, role, &name, days)?;
            out(&format!(
                "signed {role} {name}: {} and {} (no key: it stays where it was made). Send \
                 both back; they go beside key.pem in the {role}'s bundle folder",
                path.join("cert.pem").display(),
                path.join("ca.pem").display()
            ));
        }
        PkiCommand::Request { admin, out: folder } => {
            let (key, csr) = shared::cert::write_request(&folder, "admin", &admin)
                .map_err(anyhow::Error::msg)?;
            out(&format!(
                "key: {} (keep it here)\nrequest: {}: send it to the CA operator for \
                 `coordinator pki sign {} --admin {admin} --dir PKI`, and put the cert.pem and \
                 ca.pem you get back in {}",
                key.display(),
                csr.display(),
                csr.display(),
                folder.display()
            ));
        }
        PkiCommand::IssueServer { dir, server_names } => {
            let pki = Pki::open(&dir)?;
            let path = pki.issue_server(&server_names)?;
            out(&format!(
                "server certificate ({}): {}; a running coordinator using these files serves \
                 the new pair to new connections",
                server_names.join(", "),
                path.display()
            ));
        }
    }
    Ok(())
}
