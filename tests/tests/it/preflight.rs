//! `doctor` names each way a setup goes wrong with its own message (a wrong CA, an expired
//! certificate, a skewed clock, an unreachable coordinator, a broken manifest; on the server,
//! a CRL from another CA), and the server's TLS follows its files: a renewed server
//! certificate is served to the next connection, and a certificate put on the CRL is refused
//! at the next handshake, both without a restart.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use coordinator::identity::Role;
use coordinator::pki::Pki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tests::federation::Federation;

/// `site-agent doctor --config CONFIG` with `env`: (exit code, stdout).
fn doctor(config: &Path, env: &[(&str, &str)]) -> Result<(Option<i32>, String)> {
    let out = Command::new(tests::bin("site-agent")?)
        .args(["--quiet", "doctor", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .env("RUST_LOG", "off")
        .output()?;
    Ok((out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// The FAIL lines of a doctor run.
fn failed(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| l.starts_with("FAIL")).collect()
}

/// `site-a.toml` of `fed` with `from` replaced by `to`, written as `name`.
fn variant(fed: &Federation, name: &str, from: &str, to: &str) -> Result<std::path::PathBuf> {
    let text = std::fs::read_to_string(fed.root.join("site-a.toml"))?;
    anyhow::ensure!(text.contains(from), "{from:?} not in the config");
    let path = fed.root.join(name);
    std::fs::write(&path, text.replace(from, to))?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_each_problem_with_its_own_message() -> Result<()> {
    let fed = Federation::builder().sites(1).without_agents().start().await?;
    fed.site_config("site-a")?;
    let good = fed.root.join("site-a.toml");
    let (code, out) = doctor(&good, &[])?;
    assert_eq!(code, Some(0), "{out}");
    assert!(failed(&out).is_empty(), "{out}");
    assert!(out.contains("waiting for") || out.contains("not yet known"), "{out}");

    // A skewed clock.
    let (code, out) = doctor(&good, &[("FEDTUNE_TEST_CLOCK_SKEW_MS", "-120000")])?;
    assert_eq!(code, Some(1));
    let f = failed(&out);
    assert!(f.len() == 1 && f[0].contains("clock") && f[0].contains("120."), "{out}");
    assert!(f[0].contains("behind") && f[0].contains("time synchronisation"), "{out}");

    // An unreachable coordinator: a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let cfg = variant(&fed, "down.toml", &fed.addr.to_string(), &closed.to_string())?;
    let (code, out) = doctor(&cfg, &[])?;
    assert_eq!(code, Some(1));
    let f = failed(&out);
    assert!(f.len() == 1 && f[0].contains("reach") && f[0].contains("refused"), "{out}");

    // A whole bundle from another consortium's CA: the coordinator's certificate is not its.
    let other = tempfile::tempdir()?;
    let other_pki = Pki::init(other.path(), &["localhost".into()])?;
    let foreign = other_pki.issue(Role::Site, "site-a", 30)?;
    let bundle = fed.bundle(Role::Site, "site-a");
    let cfg = variant(
        &fed,
        "foreign.toml",
        bundle.to_str().context("utf-8")?,
        foreign.to_str().context("utf-8")?,
    )?;
    let (code, out) = doctor(&cfg, &[])?;
    assert_eq!(code, Some(1));
    let f = failed(&out);
    assert!(f.len() == 1 && f[0].contains("tls") && f[0].contains("not signed by the CA"), "{out}");

    // Our certificate with another CA's ca.pem: the bundle is inconsistent.
    let mixed = fed.root.join("mixed");
    std::fs::create_dir_all(&mixed)?;
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(bundle.join(f), mixed.join(f))?;
    }
    std::fs::copy(foreign.join("ca.pem"), mixed.join("ca.pem"))?;
    let cfg = variant(
        &fed,
        "mixed.toml",
        bundle.to_str().context("utf-8")?,
        mixed.to_str().context("utf-8")?,
    )?;
    let (_, out) = doctor(&cfg, &[])?;
    let f = failed(&out);
    assert!(
        f[0].contains("certificate") && f[0].contains("not issued by the CA in ca.pem"),
        "{out}"
    );

    // An expired certificate.
    let expired = Pki::open(&fed.pki_dir)?.issue(Role::Site, "site-x", -1)?;
    let cfg = variant(
        &fed,
        "expired.toml",
        bundle.to_str().context("utf-8")?,
        expired.to_str().context("utf-8")?,
    )?;
    let (code, out) = doctor(&cfg, &[])?;
    assert_eq!(code, Some(1));
    let f = failed(&out);
    assert!(f[0].contains("certificate") && f[0].contains("expired on"), "{out}");
    assert!(f.iter().any(|l| l.contains("tls") && l.contains("not tried")), "{out}");

    // A broken manifest.
    let broken = fed.root.join("broken-manifest.toml");
    std::fs::write(&broken, "this is = not [a manifest")?;
    let manifest = fed.root.join("site-a-data/manifest.toml");
    let cfg = variant(
        &fed,
        "broken.toml",
        manifest.to_str().context("utf-8")?,
        broken.to_str().context("utf-8")?,
    )?;
    let (code, out) = doctor(&cfg, &[])?;
    assert_eq!(code, Some(1));
    let f = failed(&out);
    assert!(
        f.len() == 1 && f[0].contains("data") && f[0].contains("broken-manifest.toml"),
        "{out}"
    );

    // The server's doctor: a CRL signed by another CA is caught.
    let cfg = fed.server_config();
    let toml_path = fed.root.join("coordinator.toml");
    std::fs::write(&toml_path, toml::to_string(&cfg)?)?;
    let ok = tests::coordinator(&["doctor", "--config", toml_path.to_str().context("utf-8")?])?;
    assert_eq!(ok.code, Some(0), "{}{}", ok.stdout, ok.stderr);
    assert!(ok.stdout.contains("in use by a running coordinator"), "{}", ok.stdout);
    let mut bad = cfg.clone();
    bad.tls.crl = Some(other.path().join("crl.pem"));
    std::fs::write(&toml_path, toml::to_string(&bad)?)?;
    let out = tests::coordinator(&["doctor", "--config", toml_path.to_str().context("utf-8")?])?;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("not signed by the client CA")),
        "{}",
        out.stdout
    );
    fed.shutdown().await
}

/// A rustls client with a bundle's files (read into memory).
struct Bundle {
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl Bundle {
    fn read(dir: &Path) -> Result<Self> {
        let chain =
            CertificateDer::pem_file_iter(dir.join("cert.pem"))?.collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            chain,
            key: std::fs::read(dir.join("key.pem"))?,
            ca: std::fs::read(dir.join("ca.pem"))?,
        })
    }

    /// Handshakes with `addr` and waits briefly for the server's verdict: the server's
    /// certificate, or the error.
    async fn handshake(&self, addr: std::net::SocketAddr) -> Result<Vec<u8>, String> {
        use tokio::io::AsyncReadExt;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&self.ca) {
            roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| e.to_string())?;
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(self.chain.clone(), key)
            .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
        let served =
            tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
        // TLS 1.3: the server judges the client's certificate after the client's half.
        let mut byte = [0u8; 1];
        if let Ok(Err(e)) =
            tokio::time::timeout(Duration::from_millis(500), tls.read(&mut byte)).await
        {
            return Err(e.to_string());
        }
        served.ok_or_else(|| "no server certificate".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_follows_a_renewed_certificate_and_the_crl_without_a_restart() -> Result<()> {
    let fed = Federation::builder().sites(2).without_agents().start().await?;
    let a = Bundle::read(&fed.bundle(Role::Site, "site-a"))?;
    let b = Bundle::read(&fed.bundle(Role::Site, "site-b"))?;
    let first = a.handshake(fed.addr).await.map_err(anyhow::Error::msg)?;

    // A renewed server certificate is served to the next connection.
    let pki = Pki::open(&fed.pki_dir)?;
    pki.issue_server(&["localhost".into(), "127.0.0.1".into()])?;
    let renewed = std::fs::read(fed.pki_dir.join("server/cert.pem"))?;
    let renewed = CertificateDer::from_pem_slice(&renewed)?.to_vec();
    assert_ne!(first, renewed);
    let mut served = first.clone();
    for _ in 0..30 {
        served = a.handshake(fed.addr).await.map_err(anyhow::Error::msg)?;
        if served == renewed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(served, renewed, "the renewed certificate is served without a restart");

    // A revoked certificate is refused at the handshake; another site's is not.
    pki.revoke(Role::Site, "site-a")?;
    let refused = a.handshake(fed.addr).await.expect_err("site-a is on the CRL");
    assert!(refused.contains("CertificateRevoked"), "{refused}");
    b.handshake(fed.addr).await.map_err(anyhow::Error::msg)?;
    // A CRL that does not parse keeps the last one read: site-a stays refused.
    std::fs::write(
        fed.pki_dir.join("crl.pem"),
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )?;
    let still = a.handshake(fed.addr).await.expect_err("still revoked");
    assert!(still.contains("CertificateRevoked"), "{still}");
    b.handshake(fed.addr).await.map_err(anyhow::Error::msg)?;
    fed.shutdown().await
}
