//! The scale benchmarks' bench: a consortium PKI of N sites, the real `coordinator serve`
//! binary on 127.0.0.1 (a child process, so its CPU time and memory are its own), the study
//! lead's admin client, weights files of a chosen size, and probes of the coordinator
//! process. `src/bin/scale.rs` runs the benchmarks over it.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use coordinator::identity::Role;
use coordinator::lead::Conn;
use coordinator::pki::Pki;
use coordinator::server::ServerConfig;
use proto::pb::{self, admin_service_client::AdminServiceClient};
use tonic::transport::Channel;

/// A coordinator process and the PKI and sites around it.
#[derive(Debug)]
pub struct Bench {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub pki: Pki,
    pub addr: std::net::SocketAddr,
    pub sites: Vec<String>,
    pub child: Child,
    pub admin: AdminServiceClient<Channel>,
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Bench {
    /// A PKI with `sites` site bundles (`sim-0000`...), and the coordinator started with
    /// leases of `lease_seconds`.
    pub async fn start(sites: usize, lease_seconds: u32) -> Result<Self> {
        crate::federation::init_tls();
        let dir = tempfile::tempdir()?;
        let root = dir.path().to_owned();
        let pki = Pki::init(&root.join("pki"), &["localhost".into(), "127.0.0.1".into()])?;
        pki.issue(Role::Admin, "lead", 30)?;
        let names: Vec<String> = (0..sites).map(|i| format!("sim-{i:04}")).collect();
        for n in &names {
            pki.issue(Role::Site, n, 30)?;
        }
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut cfg = ServerConfig::for_pki(pki.dir(), &root.join("data"), &addr.to_string());
        cfg.limits.lease_seconds = lease_seconds;
        cfg.limits.max_poll_seconds = 30;
        // One connection per agent, each its own identity: the defaults (256 connections)
        // are for a smaller consortium. Every other limit is the default.
        cfg.limits.max_connections = (sites as u32 + 64).max(cfg.limits.max_connections);
        let path = root.join("coordinator.toml");
        std::fs::write(&path, toml::to_string(&cfg)?)?;
        let child =
            crate::spawn_coordinator(&path, &root.join("coordinator.log"), &[("RUST_LOG", "warn")])
                .await?;
        let conn = Conn {
            coordinator: format!("https://{addr}"),
            bundle: pki.bundle_dir(Role::Admin, "lead"),
            server_name: "localhost".into(),
            json: false,
        };
        let admin = coordinator::lead::client::connect(&conn).await?;
        Ok(Self { _dir: dir, root, pki, addr, sites: names, child, admin })
    }

    /// Options for `site_agent::simulate` over the first `n` sites.
    pub fn agents(
        &self,
        n: usize,
        workload: Duration,
        heartbeat: Duration,
        fetch: bool,
    ) -> site_agent::simulate::Options {
        site_agent::simulate::Options {
            coordinator: format!("https://{}", self.addr),
            server_name: "localhost".into(),
            bundles: self.sites[..n].iter().map(|s| self.pki.bundle_dir(Role::Site, s)).collect(),
            workload,
            heartbeat,
            fetch,
            poll_seconds: 30,
        }
    }

    /// Approves the first `n` sites once each has said hello (the simulated agents do).
    pub async fn approve(&mut self, n: usize) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        loop {
            let sites = self.admin.list_sites(pb::ListSitesRequest {}).await?.into_inner().sites;
            let known: std::collections::HashSet<String> =
                sites.iter().map(|s| s.name.clone()).collect();
            if self.sites[..n].iter().all(|s| known.contains(s)) {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("{} of {n} sites said hello within 300 s", known.len());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // One call per site, paced by the coordinator's rate limit for the lead (50 per
        // second after a burst of 200): refused calls wait and are sent again.
        for s in &self.sites[..n] {
            loop {
                let req = pb::SiteRequest { name: s.clone(), ..Default::default() };
                match self.admin.approve_site(req).await {
                    Ok(_) => break,
                    Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Pushes `file` as `name` and makes study `name` over every site.
    pub async fn study(&mut self, name: &str, file: &Path) -> Result<pb::ModelInfo> {
        let info =
            coordinator::lead::client::push_model(&mut self.admin, file, name, false).await?;
        self.admin
            .create_study(pb::CreateStudyRequest {
                name: name.into(),
                base_model: name.into(),
                sites: self.sites.clone(),
            })
            .await?;
        Ok(info)
    }

    /// Starts an evaluate round of `study` over the first `n` sites; returns its id and the
    /// Unix milliseconds just before the request was sent.
    pub async fn evaluate_round(&mut self, study: &str, n: usize) -> Result<(String, i64)> {
        let sent = now_ms();
        let spec = pb::TaskSpec { kind: pb::TaskKind::Evaluate as i32, ..Default::default() };
        let r = self
            .admin
            .start_round(pb::StartRoundRequest {
                study: study.into(),
                spec: Some(spec),
                sites: self.sites[..n].to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok((r.round_id, sent))
    }

    /// Waits until the round is no longer running; returns it.
    pub async fn wait_round(&mut self, id: &str, limit: Duration) -> Result<pb::RoundInfo> {
        let until = std::time::Instant::now() + limit;
        loop {
            let r =
                self.admin.get_round(pb::RoundRequest { round_id: id.into() }).await?.into_inner();
            if r.state != pb::RoundState::Running as i32 {
                return Ok(r);
            }
            if std::time::Instant::now() > until {
                bail!("round {id} still running after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The coordinator's CPU seconds (user + system) so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<f64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        // /proc counts in USER_HZ, 100 on Linux for every architecture it runs fedtune on.
        f.get(11).zip(f.get(12)).map_or(0.0, |(u, s)| (u + s) / 100.0)
    }

    /// Samples the coordinator's resident memory every 20 ms until the guard is dropped.
    pub fn watch_memory(&self) -> MemoryWatch {
        let pid = self.child.id();
        let peak = Arc::new(AtomicU64::new(rss_bytes(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        MemoryWatch { start: rss_bytes(pid), peak, stop }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The coordinator's resident memory at the start of a phase and its peak since.
#[derive(Debug)]
pub struct MemoryWatch {
    pub start: u64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl MemoryWatch {
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Writes a weights file of about `mb` MB (a real net of the `resnet103` layout, its widths
/// scaled to reach the size; `tiny` when `mb` is 0) and returns its path and size.
pub fn weights_file(dir: &Path, mb: u64) -> Result<(PathBuf, u64)> {
    use shared::architecture::ModelConfig;
    let organs = shared::organs::OrganMap::new(
        [(1, "brainstem".to_owned()), (2, "mandible".to_owned())].into(),
    )?;
    let device = candle_core::Device::Cpu;
    let mut config = ModelConfig::preset(if mb == 0 { "tiny" } else { "resnet103" })?;
    let path = dir.join(format!("model-{mb}mb.safetensors"));
    let save = |config: &ModelConfig| -> Result<u64> {
        let net = site_agent::model::Net::new(config, &organs, 7, &device)?;
        site_agent::weights::save(&net, &Default::default(), &path)?;
        Ok(std::fs::metadata(&path)?.len())
    };
    let mut size = save(&config)?;
    if mb > 0 {
        // Parameters grow with the square of the widths.
        let scale = ((mb * 1_000_000) as f64 / size as f64).sqrt();
        // Multiples of 8, as the presets' widths are.
        config.widths = config
            .widths
            .iter()
            .map(|w| (((*w as f64 * scale) / 8.0).round() as usize).max(1) * 8)
            .collect();
        // The name stays the preset's: a round plans by it (the layer count, which widths
        // do not change); the manifest carries the widths.
        size = save(&config)?;
    }
    Ok((path, size))
}

/// Percentile `p` (0..=100) of `v` (nearest rank); 0 when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// `n` concurrent copies of `file` over raw TLS on loopback (tokio-rustls, the coordinator's
/// server certificate, the same CA; no HTTP/2, no gRPC, 1 MiB writes): the local limit a
/// download is measured against. Returns the aggregate bytes per second.
pub async fn raw_tls(bench: &Bench, file: &Path, n: usize) -> Result<f64> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = bench.pki.server_dir();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(server.join("cert.pem"))?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(server.join("key.pem"))?;
    let config =
        rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(bench.pki.ca_cert_path())? {
        roots.add(c?)?;
    }
    let client =
        rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let path = file.to_owned();
    let server = tokio::spawn(async move {
        let mut sends = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (tcp, _) = listener.accept().await?;
            let (acceptor, path) = (acceptor.clone(), path.clone());
            sends.spawn(async move {
                let mut tls = acceptor.accept(tcp).await?;
                let mut f = tokio::fs::File::open(&path).await?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let k = f.read(&mut buf).await?;
                    if k == 0 {
                        break;
                    }
                    tls.write_all(&buf[..k]).await?;
                }
                tls.shutdown().await?;
                anyhow::Ok(())
            });
        }
        while let Some(r) = sends.join_next().await {
            r??;
        }
        anyhow::Ok(())
    });
    let started = Instant::now();
    let mut reads = tokio::task::JoinSet::new();
    for _ in 0..n {
        let connector = connector.clone();
        reads.spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let mut tls = connector.connect(ServerName::try_from("localhost")?, tcp).await?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(k) => total += k as u64,
                    // The server closed after its close_notify: done.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e.into()),
                }
            }
            anyhow::Ok(total)
        });
    }
    let mut bytes = 0u64;
    while let Some(r) = reads.join_next().await {
        bytes += r??;
    }
    let secs = started.elapsed().as_secs_f64();
    server.await??;
    Ok(bytes as f64 / secs)
}

/// The real agent's audited link for site `i` (its config written beside the bench).
pub async fn site_link(bench: &Bench, i: usize) -> Result<site_agent::agent::Link> {
    let name = &bench.sites[i];
    let storage = bench.root.join(format!("{name}-agent"));
    let text = format!(
        "version = 1\n[coordinator]\naddress = \"https://{}\"\nproxy = \"none\"\n[tls]\nbundle = \"{}\"\n\
         [data]\nmanifest = \"{}\"\n[storage]\ndir = \"{}\"\n",
        bench.addr,
        bench.pki.bundle_dir(Role::Site, name).display(),
        bench.root.join("none.toml").display(),
        storage.display()
    );
    let path = bench.root.join(format!("{name}.toml"));
    std::fs::write(&path, &text)?;
    let cfg = site_agent::agent::config::SiteConfig::parse(&text, &path)?;
    std::fs::create_dir_all(&storage)?;
    let audit = site_agent::agent::audit::AuditLog::open(&storage.join("audit"))?;
    Ok(site_agent::agent::Link::connect(&cfg, audit).await?)
}
