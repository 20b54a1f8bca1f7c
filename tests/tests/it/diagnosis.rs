//! What a site agent says when it cannot reach the coordinator: the layer that broke (TCP,
//! TLS, the coordinator's answer) and what to do, for each fault hospital IT meets.

use std::time::Duration;

use coordinator::identity::Role;
use site_agent::agent::Link;
use site_agent::agent::audit::AuditLog;
use site_agent::agent::config::SiteConfig;
use tests::federation::Federation;

type R = anyhow::Result<()>;

async fn diagnosis(cfg: &SiteConfig) -> anyhow::Result<String> {
    let audit = AuditLog::open(&cfg.storage.dir)?;
    let attempt = async {
        let mut link = Link::connect(cfg, audit).await?;
        link.hello(Default::default()).await.map(drop)
    };
    let err = match tokio::time::timeout(Duration::from_secs(30), attempt).await? {
        Ok(()) => anyhow::bail!("the connection worked"),
        Err(e) => e,
    };
    Ok(err.diagnose(cfg).await.unwrap_or_else(|| format!("(no diagnosis) {err}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_fault_is_named_with_its_layer_and_what_to_do() -> R {
    let fed = Federation::builder().sites(1).without_agents().start().await?;
    let good = fed.site_config("site-a")?;

    // Nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = closed.local_addr()?.port();
    drop(closed);
    let mut cfg = good.clone();
    cfg.coordinator.address = format!("https://127.0.0.1:{port}");
    let d = diagnosis(&cfg).await?;
    eprintln!("nothing listening: {d}");
    assert!(d.starts_with("TCP: nothing is listening at https://127.0.0.1:"), "{d}");

    // A plain-HTTP port.
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http_addr = http.local_addr()?;
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = http.accept().await {
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await;
        }
    });
    let mut cfg = good.clone();
    cfg.coordinator.address = format!("https://{http_addr}");
    let d = diagnosis(&cfg).await?;
    eprintln!("plain HTTP: {d}");
    assert!(d.starts_with("TLS: ") && d.contains("does not answer in TLS"), "{d}");

    // Another consortium's bundle: the coordinator's certificate is not signed by its CA.
    let other = coordinator::pki::Pki::init(&fed.root.join("other-pki"), &["localhost".into()])?;
    let mut cfg = good.clone();
    cfg.tls.bundle = other.issue(Role::Site, "site-a", 30)?;
    let d = diagnosis(&cfg).await?;
    eprintln!("another CA: {d}");
    assert!(d.contains("is not signed by the CA in") && d.contains("ca.pem"), "{d}");

    // A wrong server name.
    let mut cfg = good.clone();
    cfg.coordinator.server_name = "coordinator.example".into();
    let d = diagnosis(&cfg).await?;
    eprintln!("wrong name: {d}");
    assert!(d.contains("does not name \"coordinator.example\""), "{d}");

    // Our certificate refused: trusted CA, but the client certificate from another CA.
    let mut cfg = good.clone();
    let stranger = other.issue(Role::Site, "site-z", 30)?;
    std::fs::copy(fed.pki_dir.join("ca.pem"), stranger.join("ca.pem"))?;
    cfg.tls.bundle = stranger;
    let d = diagnosis(&cfg).await?;
    eprintln!("our certificate refused: {d}");
    assert!(d.starts_with("TLS: the coordinator refused this site's certificate"), "{d}");

    // The application: a certificate of the consortium, but not a site's.
    let mut cfg = good.clone();
    cfg.tls.bundle = fed.bundle(Role::Admin, "lead");
    let d = diagnosis(&cfg).await?;
    eprintln!("not a site: {d}");
    assert!(d.starts_with("application: ") && d.contains("cannot call the site service"), "{d}");
    fed.shutdown().await
}
