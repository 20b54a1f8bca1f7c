//! An in-process federation for tests: a consortium PKI, a coordinator on 127.0.0.1:0 and site
//! agents on phantom data, all speaking real mTLS gRPC over loopback.
//!
//! ```ignore
//! let fed = Federation::builder().sites(3).start().await?;
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use coordinator::identity::Role;
use coordinator::lead::Conn;
use coordinator::pki::Pki;
use coordinator::server::{LimitsConfig, ServerConfig};
use proto::pb::{self, admin_service_client::AdminServiceClient};
use site_agent::agent::config::SiteConfig;
use site_agent::data::phantom::{self, Center};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use crate::agents::{Agent, site_link};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Installs the process' TLS crypto provider once.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A running coordinator and how to stop it.
#[derive(Debug)]
enum Server {
    /// In this process, stopped gracefully.
    InProcess {
        stop: oneshot::Sender<()>,
        task: JoinHandle<Result<(), coordinator::server::ServeError>>,
    },
    /// The real `coordinator serve` binary, stopped with SIGKILL.
    Process(std::process::Child),
}

/// Builds a [`Federation`].
#[derive(Debug)]
pub struct Builder {
    sites: usize,
    start_agents: bool,
    cases: usize,
    process: bool,
    limits: LimitsConfig,
    data_dir: Option<PathBuf>,
    /// Per site: its center, cases and test cases (default: target-a and target-b in turn,
    /// `cases` cases, one of them for test).
    centers: Option<Vec<(Center, usize, usize)>>,
}

impl Builder {
    /// One site per entry, with that center's phantoms: (center, cases, of which test).
    pub fn centers(mut self, centers: Vec<(Center, usize, usize)>) -> Self {
        self.sites = centers.len();
        self.centers = Some(centers);
        self
    }

    pub fn sites(mut self, n: usize) -> Self {
        self.sites = n;
        self
    }
    /// Run the coordinator as the real binary (which tests can kill) instead of in-process.
    pub fn coordinator_process(mut self) -> Self {
        self.process = true;
        self
    }

    /// Change the coordinator's limits from the test defaults (short leases and polls).
    pub fn limits(mut self, change: impl FnOnce(&mut LimitsConfig)) -> Self {
        change(&mut self.limits);
        self
    }

    /// Keep the coordinator's data in `dir` (a test's own mount, say) instead of the
    /// federation's temporary folder.
    pub fn coordinator_data(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_owned());
        self
    }

    /// Make the sites' PKI bundles and data but do not start their agents.
    pub fn without_agents(mut self) -> Self {
        self.start_agents = false;
        self
    }

    pub async fn start(self) -> Result<Federation> {
        init_tls();
        let dir = tempfile::tempdir()?;
        let root = dir.path().to_owned();
        let pki_dir = root.join("pki");
        let pki = Pki::init(&pki_dir, &["localhost".into(), "127.0.0.1".into()])?;
        pki.issue(Role::Admin, "lead", 30)?;
        let mut sites = Vec::new();
        for i in 0..self.sites {
            let name = format!("site-{}", (b'a' + i as u8) as char);
            pki.issue(Role::Site, &name, 30)?;
            let data = root.join(format!("{name}-data"));
            let (center, cases, test) = match &self.centers {
                Some(c) => c[i],
                None if i % 2 == 0 => (Center::TargetA, self.cases, 1),
                None => (Center::TargetB, self.cases, 1),
            };
            phantom::write_center(center, cases, test, 10 + i as u64, &data)?;
            sites.push(name);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let data_dir = self.data_dir.unwrap_or_else(|| root.join("coordinator-data"));
        let mut fed = Federation {
            dir,
            root,
            pki_dir,
            addr,
            server: None,
            agents: Vec::new(),
            sites,
            limits: self.limits,
            data_dir,
            process: self.process,
        };
        if self.process {
            drop(listener);
            fed.spawn_process().await?;
        } else {
            fed.serve(listener)?;
        }
        if self.start_agents {
            for name in fed.sites.clone() {
                fed.start_agent(&name)?;
            }
        }
        Ok(fed)
    }
}

/// The federation under test.
#[derive(Debug)]
pub struct Federation {
    /// Keeps the temporary folder alive.
    #[allow(dead_code)]
    dir: tempfile::TempDir,
    pub root: PathBuf,
    pub pki_dir: PathBuf,
    pub addr: SocketAddr,
    server: Option<Server>,
    pub agents: Vec<Agent>,
    pub sites: Vec<String>,
    limits: LimitsConfig,
    /// The coordinator's `data_dir`.
    pub data_dir: PathBuf,
    /// Whether the coordinator runs as the real binary.
    process: bool,
}

impl Federation {
    pub fn builder() -> Builder {
        Builder {
            sites: 1,
            start_agents: true,
            cases: 3,
            process: false,
            limits: LimitsConfig {
                lease_seconds: 6,
                max_poll_seconds: 2,
                round_deadline_seconds: 600,
                max_attempts: 5,
                tick_ms: 200,
                ..Default::default()
            },
            data_dir: None,
            centers: None,
        }
    }

    pub fn server_config(&self) -> ServerConfig {
        let mut cfg = ServerConfig::for_pki(&self.pki_dir, &self.data_dir, "127.0.0.1:0");
        cfg.limits = self.limits.clone();
        cfg
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) -> Result<()> {
        let (stop, rx) = oneshot::channel::<()>();
        let cfg = self.server_config();
        let task = tokio::spawn(coordinator::server::serve(cfg, listener, async move {
            let _ = rx.await;
        }));
        self.server = Some(Server::InProcess { stop, task });
        Ok(())
    }

    /// Starts `coordinator serve` on `self.addr` with the test limits; waits for its
    /// `listening on` line.
    async fn spawn_process(&mut self) -> Result<()> {
        let mut cfg = self.server_config();
        cfg.listen = self.addr.to_string();
        let toml = toml::to_string(&cfg).context("writing coordinator.toml")?;
        let path = self.root.join("coordinator.toml");
        std::fs::write(&path, toml)?;
        // Appended to: a restarted coordinator's log follows the killed one's.
        let child =
            crate::spawn_coordinator(&path, &self.root.join("coordinator.log"), &[]).await?;
        self.server = Some(Server::Process(child));
        Ok(())
    }

    /// Stops the coordinator (in-flight calls drain) and waits until it has let go of its
    /// database.
    pub async fn stop_coordinator(&mut self) -> Result<()> {
        match self.server.take() {
            Some(Server::InProcess { stop, task }) => {
                let _ = stop.send(());
                tokio::time::timeout(Duration::from_secs(30), task)
                    .await
                    .context("coordinator stop")???;
            }
            Some(Server::Process(mut child)) => {
                // SIGKILL: no drain, no flush; only what was committed survives.
                child.kill()?;
                child.wait()?;
            }
            None => {}
        }
        Ok(())
    }

    /// Stops the coordinator (a process is killed) and starts it again on the same address
    /// and data.
    pub async fn restart_coordinator(&mut self) -> Result<()> {
        self.stop_coordinator().await?;
        if self.process {
            return self.spawn_process().await;
        }
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("re-binding the coordinator's port"),
            }
        };
        self.serve(listener)
    }

    pub fn bundle(&self, role: Role, name: &str) -> PathBuf {
        Pki::open(&self.pki_dir).expect("pki").bundle_dir(role, name)
    }

    pub fn site_config(&self, name: &str) -> Result<SiteConfig> {
        let text = format!(
            r#"version = 1
[coordinator]
address = "https://{addr}"
proxy = "none"
[tls]
bundle = "{bundle}"
[data]
manifest = "{data}/manifest.toml"
[storage]
dir = "{storage}"
[agent]
poll_seconds = 2
heartbeat_seconds = 1
max_backoff_seconds = 2
"#,
            addr = self.addr,
            bundle = self.bundle(Role::Site, name).display(),
            data = self.root.join(format!("{name}-data")).display(),
            storage = self.root.join(format!("{name}-agent")).display(),
        );
        let path = self.root.join(format!("{name}.toml"));
        std::fs::write(&path, &text)?;
        Ok(SiteConfig::parse(&text, &path)?)
    }

    pub fn start_agent(&mut self, name: &str) -> Result<()> {
        let config = self.site_config(name)?;
        self.start_agent_with(name, config)
    }

    /// Starts site `name`'s agent with a config the test changed (another address, ...).
    pub fn start_agent_with(&mut self, name: &str, config: SiteConfig) -> Result<()> {
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(site_agent::agent::run(config.clone(), async move {
            let _ = rx.await;
        }));
        self.agents.push(Agent { name: name.into(), config, stop: Some(stop), task: Some(task) });
        Ok(())
    }

    pub fn conn(&self, role: Role, name: &str) -> Conn {
        Conn {
            coordinator: format!("https://{}", self.addr),
            bundle: self.bundle(role, name),
            server_name: "localhost".into(),
            json: false,
        }
    }

    /// A lazy channel to the coordinator trusting the consortium CA, presenting the bundle
    /// in `bundle` (cert.pem, key.pem) if any.
    pub fn channel(&self, bundle: Option<&Path>) -> Channel {
        self.channel_with(bundle, |e| e)
    }

    /// [`Self::channel`] with more endpoint settings.
    pub fn channel_with(
        &self,
        bundle: Option<&Path>,
        endpoint: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Channel {
        let read = |p: PathBuf| std::fs::read(&p).expect("bundle file");
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(self.pki_dir.join("ca.pem"))))
            .domain_name("localhost");
        if let Some(b) = bundle {
            tls =
                tls.identity(Identity::from_pem(read(b.join("cert.pem")), read(b.join("key.pem"))));
        }
        let e = Channel::from_shared(format!("https://{}", self.addr))
            .expect("address")
            .tls_config(tls)
            .expect("tls")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
        endpoint(e).connect_lazy()
    }

    pub async fn admin(&self) -> Result<AdminServiceClient<Channel>> {
        coordinator::lead::connect(&self.conn(Role::Admin, "lead")).await
    }

    /// Writes an untrained model of `config` for the phantom organs; returns its path.
    pub fn base_model(&self, config: &str) -> Result<PathBuf> {
        self.model_file(config, 5)
    }

    /// Writes an untrained model of `config` initialised from `seed` (different seeds, different
    /// bytes); returns its path.
    pub fn model_file(&self, config: &str, seed: u64) -> Result<PathBuf> {
        let cfg = site_agent::model::ModelConfig::preset(config)?;
        let net = site_agent::model::Net::new(
            &cfg,
            &phantom::organ_map(),
            seed,
            &candle_core::Device::Cpu,
        )?;
        let name = if seed == 5 { format!("base-{config}") } else { format!("{config}-{seed}") };
        let path = self.root.join(format!("{name}.safetensors"));
        site_agent::weights::save(&net, &Default::default(), &path)?;
        Ok(path)
    }

    /// Pushes a base model, approves every site and creates study `name` over all of them.
    pub async fn study(&self, name: &str, config: &str) -> Result<pb::StudyInfo> {
        let mut admin = self.admin().await?;
        let model = self.base_model(config)?;
        coordinator::lead::push_model(&mut admin, &model, &format!("base-{config}"), false).await?;
        for s in &self.sites {
            admin.approve_site(pb::SiteRequest { name: s.clone(), ..Default::default() }).await?;
        }
        Ok(admin
            .create_study(pb::CreateStudyRequest {
                name: name.into(),
                base_model: format!("base-{config}"),
                sites: self.sites.clone(),
            })
            .await?
            .into_inner())
    }

    /// Starts a round of `study` with `spec` (every other field at its default); returns its id.
    pub async fn start_round(&self, study: &str, spec: pb::TaskSpec) -> Result<String> {
        let r = self
            .admin()
            .await?
            .start_round(pb::StartRoundRequest {
                study: study.into(),
                spec: Some(spec),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(r.round_id)
    }

    /// A round's state and tasks.
    pub async fn round(&self, round: &str) -> Result<pb::RoundInfo> {
        let r = self.admin().await?.get_round(pb::RoundRequest { round_id: round.into() }).await?;
        Ok(r.into_inner())
    }

    /// A round's recorded results.
    pub async fn results(&self, round: &str) -> Result<pb::RoundResults> {
        let r =
            self.admin().await?.get_results(pb::RoundRequest { round_id: round.into() }).await?;
        Ok(r.into_inner())
    }

    /// Waits until the round leaves Running; fails after `secs`.
    pub async fn wait_round(&self, round: &str, secs: u64) -> Result<pb::RoundInfo> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            // A fresh connection each time: the coordinator may be restarting.
            if let Ok(mut admin) = self.admin().await
                && let Ok(r) = admin.get_round(pb::RoundRequest { round_id: round.into() }).await
            {
                let r = r.into_inner();
                if r.state != pb::RoundState::Running as i32 {
                    return Ok(r);
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("round {round} still running after {secs} s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn storage(&self, site: &str) -> PathBuf {
        self.root.join(format!("{site}-agent"))
    }

    pub fn data_dir(&self, site: &str) -> PathBuf {
        self.root.join(format!("{site}-data"))
    }

    pub async fn shutdown(mut self) -> Result<()> {
        for a in &mut self.agents {
            a.stop().await?;
        }
        self.stop_coordinator().await
    }
}
