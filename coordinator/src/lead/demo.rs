//! `coordinator demo`: the transfer study on one machine, as it runs in a consortium.
//!
//! Generates phantom centers (one source, N targets), a consortium CA with a bundle per party,
//! starts `coordinator serve` and one `site-agent run` per hospital as separate processes on
//! 127.0.0.1 with mutual TLS, approves the sites, runs the transfer round (the source trains
//! and uploads Model_S; every target evaluates it, trains Model_T, fine-tunes Model_ST),
//! optionally replicated over seeds, optionally the sweeps, and with `--federated` FedAvg of
//! the targets' tails (Model_FT) and the cross-site matrix; then writes the report and prints
//! its table.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::pb;

use super::client::AdminClient;
use super::templates::{self, FedOptions, Template, TemplateOptions};
use super::{Conn, round_state};
use crate::identity::Role;
use crate::pki::Pki;
use crate::report::{self, Format};

/// Sizes and hyperparameters of a demo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// The `tiny` model on a few small cases: seconds; what CI runs.
    Tiny,
    /// The `small` model: the measured demo (README and bench/RESULTS.md give its time).
    Small,
}

struct Sizes {
    config: &'static str,
    source_cases: usize,
    target_train: usize,
    target_test: usize,
    source_epochs: u32,
    epochs: u32,
    finetune_epochs: u32,
    lr: f64,
    batch: u32,
    /// k of Model_ST in the transfer round.
    trainable_layers: u32,
    sweep_layers: Vec<u32>,
    sweep_cases: Vec<u32>,
    /// `--federated`: FedAvg steps and local epochs a step.
    fed_rounds: u32,
    fed_epochs: u32,
}

impl Preset {
    fn sizes(self) -> Sizes {
        match self {
            Preset::Tiny => Sizes {
                config: "tiny",
                source_cases: 3,
                target_train: 2,
                target_test: 3,
                source_epochs: 8,
                epochs: 6,
                finetune_epochs: 6,
                lr: 1e-2,
                batch: 8,
                trainable_layers: 2,
                sweep_layers: vec![1, 2, 4],
                sweep_cases: vec![1, 2],
                fed_rounds: 6,
                fed_epochs: 1,
            },
            Preset::Small => Sizes {
                config: "small",
                source_cases: 6,
                target_train: 4,
                target_test: 8,
                source_epochs: 12,
                epochs: 10,
                finetune_epochs: 16,
                lr: 1e-2,
                batch: 4,
                trainable_layers: 3,
                sweep_layers: vec![1, 3, 6, 10],
                sweep_cases: vec![1, 2, 4],
                fed_rounds: 8,
                fed_epochs: 2,
            },
        }
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Target sites (hospitals that adapt Model_S), besides the source; default 2, and 3
    /// with --federated.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=6))]
    pub sites: Option<u32>,
    /// Run the transfer study this many times, replicate i with seed + i (each its own
    /// Model_S); the report gives intervals over replicates. Default 1, and 2 with
    /// --federated.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub replicates: Option<u32>,
    /// After the transfer study: FedAvg of the targets' tails (Model_FT), then every model
    /// scored at every site (the cross-site matrix).
    #[arg(long)]
    pub federated: bool,
    /// Model and phantom sizes: tiny (seconds, for tests) or small (the README's figures).
    #[arg(long, value_enum, default_value_t = Preset::Small)]
    pub preset: Preset,
    /// Seed of the phantoms and of training.
    #[arg(long, default_value_t = 17)]
    pub seed: u64,
    /// Also run the sweep (layers retrained) and cases-sweep (training cases) rounds.
    #[arg(long)]
    pub sweeps: bool,
    /// Folder for everything (phantoms, PKI, logs, report.*); default: a temporary folder
    /// whose report files are kept in ./fedtune-demo-report.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The site-agent binary (default: next to this one).
    #[arg(long)]
    pub site_agent: Option<PathBuf>,
}

/// A child process killed when dropped.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The site-agent binary: `--site-agent`, or beside this executable. Under `cargo run` it is
/// built (or rebuilt) first the same way, so that an agent left from an older checkout never
/// talks to this coordinator.
fn site_agent_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_owned());
        }
        bail!("--site-agent {}: no such file", p.display());
    }
    let exe = std::env::current_exe().context("locating the coordinator executable")?;
    let dir = exe.parent().context("the executable's folder")?;
    let path = dir.join(format!("site-agent{}", std::env::consts::EXE_SUFFIX));
    // Under `cargo run` (which sets CARGO): cargo does nothing when the agent is current.
    if let Ok(cargo) = std::env::var("CARGO") {
        let release = dir.file_name().is_some_and(|n| n == "release");
        if !path.is_file() {
            eprintln!("building site-agent (first run only) ...");
        }
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "site-agent"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().context("running cargo build -p site-agent")?;
        if status.success() && path.is_file() {
            return Ok(path);
        }
    } else if path.is_file() {
        return Ok(path);
    }
    bail!(
        "the site-agent binary is not at {}; build it with `cargo build --release -p site-agent` or pass --site-agent PATH",
        path.display()
    )
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File> {
    let path = dir.join(format!("{name}.log"));
    std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
}

/// Starts `coordinator serve` on a free loopback port; returns it with its address.
fn start_coordinator(root: &Path, pki: &Pki) -> Result<(Proc, String)> {
    // `coordinator.toml` (see the README), written here rather than through the server's own
    // type: the study lead's side knows the coordinator only through its files and its API.
    let mut tls = toml::Table::new();
    let path_of = |p: PathBuf| toml::Value::String(p.display().to_string());
    tls.insert("cert".into(), path_of(pki.dir().join("server/cert.pem")));
    tls.insert("key".into(), path_of(pki.dir().join("server/key.pem")));
    tls.insert("client_ca".into(), path_of(pki.dir().join("ca.pem")));
    tls.insert("crl".into(), path_of(pki.crl_path()));
    let mut limits = toml::Table::new();
    limits.insert("lease_seconds".into(), 60.into());
    limits.insert("max_poll_seconds".into(), 5.into());
    limits.insert("tick_ms".into(), 500.into());
    let mut cfg = toml::Table::new();
    cfg.insert("version".into(), 1.into());
    cfg.insert("listen".into(), "127.0.0.1:0".into());
    cfg.insert("data_dir".into(), path_of(root.join("coordinator-data")));
    cfg.insert("tls".into(), tls.into());
    cfg.insert("limits".into(), limits.into());
    let toml = toml::to_string(&cfg).context("writing the coordinator's configuration")?;
    let path = root.join("coordinator.toml");
    std::fs::write(&path, toml).with_context(|| format!("writing {}", path.display()))?;
    let exe = std::env::current_exe().context("locating the coordinator executable")?;
    let mut child = Command::new(exe)
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(log_file(&root.join("logs"), "coordinator")?)
        .spawn()
        .context("starting the coordinator")?;
    let stdout = child.stdout.take().context("the coordinator's stdout")?;
    let proc = Proc { child };
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .context("reading the coordinator's address")?;
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        bail!(
            "the coordinator did not start (see {})",
            root.join("logs/coordinator.log").display()
        );
    };
    Ok((proc, addr.to_owned()))
}

fn site_toml(root: &Path, pki: &Pki, addr: &str, name: &str, share: bool) -> Result<PathBuf> {
    let text = format!(
        "version = 1\n[coordinator]\naddress = \"https://{addr}\"\n[tls]\nbundle = \"{bundle}\"\n[data]\nmanifest = \"{data}/manifest.toml\"\n[storage]\ndir = \"{storage}\"\n[policy]\nshare_weights = {share}\n[agent]\npoll_seconds = 2\nheartbeat_seconds = 2\nmax_backoff_seconds = 2\n",
        bundle = pki.bundle_dir(Role::Site, name).display(),
        data = root.join(name).join("data").display(),
        storage = root.join(name).join("agent").display(),
    );
    let path = root.join(name).join("site.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Writes a phantom center's data into `site/data` with `site-agent phantom`.
fn make_phantoms(
    agent: &Path,
    center: &str,
    cases: usize,
    test: usize,
    seed: u64,
    site: &Path,
) -> Result<()> {
    let out = site.join("data");
    let run = Command::new(agent)
        .args(["phantom", "--center", center, "--cases", &cases.to_string()])
        .args(["--test", &test.to_string(), "--seed", &seed.to_string(), "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("starting {}", agent.display()))?;
    if !run.status.success() {
        bail!(
            "{} phantom --center {center} --out {} failed ({}): {}",
            agent.display(),
            out.display(),
            run.status,
            String::from_utf8_lossy(&run.stderr).trim()
        );
    }
    Ok(())
}

/// Follows a round to its end; an error unless it completed.
async fn finish(
    admin: &mut AdminClient,
    id: &str,
    what: &str,
    root: &Path,
    say: &impl Fn(&str),
) -> Result<()> {
    let end = admin.watch(id).await?;
    if end.state != pb::RoundState::Completed as i32 {
        bail!(
            "round {id} ({what}) ended {}: {} (logs in {})",
            round_state(end.state),
            end.reason,
            root.join("logs").display()
        );
    }
    say(&format!("round {id} ({what}) completed"));
    Ok(())
}

/// Runs the demo; returns the report.
pub async fn run(a: &DemoArgs) -> Result<report::Report> {
    let sizes = a.preset.sizes();
    let agent_bin = site_agent_binary(a.site_agent.as_deref())?;
    let started = Instant::now();
    let (root, _tmp) = match &a.out {
        Some(p) => {
            std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
            (std::path::absolute(p)?, None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("fedtune-demo-").tempdir()?;
            (t.path().to_owned(), Some(t))
        }
    };
    std::fs::create_dir_all(root.join("logs"))?;
    let say = |msg: &str| eprintln!("[{:>5.1} s] {msg}", started.elapsed().as_secs_f64());

    // 1. Hospitals and their (phantom) data.
    let source = "source-hospital".to_owned();
    let n_targets = a.sites.unwrap_or(if a.federated { 3 } else { 2 });
    let replicates = a.replicates.unwrap_or(if a.federated { 2 } else { 1 });
    let targets: Vec<String> =
        (0..n_targets).map(|i| format!("target-{}", (b'a' + i as u8) as char)).collect();
    say(&format!(
        "generating phantom CT for {source} and {} ({} preset) in {}",
        targets.join(", "),
        match a.preset {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
        },
        root.display()
    ));
    // The phantom generator is the site's engine: the coordinator links no training or image
    // code, so the demo asks the site-agent binary to write each center.
    let (source_cases, source_seed) = (sizes.source_cases + 1, a.seed);
    make_phantoms(&agent_bin, "source", source_cases, 1, source_seed, &root.join(&source))?;
    // Every target contours with the target-a protocol; each has its own patients.
    for (i, t) in targets.iter().enumerate() {
        let cases = sizes.target_train + sizes.target_test;
        let seed = a.seed + 1 + i as u64;
        make_phantoms(&agent_bin, "target-a", cases, sizes.target_test, seed, &root.join(t))?;
    }

    // 2. The consortium's CA and a bundle per party.
    let pki = Pki::init(&root.join("pki"), &["localhost".into(), "127.0.0.1".into()])?;
    pki.issue(Role::Admin, "lead", 30)?;
    for s in std::iter::once(&source).chain(&targets) {
        pki.issue(Role::Site, s, 30)?;
    }

    // 3. The coordinator and the agents, as processes.
    let (_coordinator, addr) = start_coordinator(&root, &pki)?;
    say(&format!("coordinator listening on {addr} (mutual TLS)"));
    let mut agents = Vec::new();
    // The targets train at the same time on one machine: share the cores between them rather
    // than let every agent's thread pool claim all of them (the source runs alone).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let target_threads = (cores / targets.len()).max(1);
    for s in std::iter::once(&source).chain(&targets) {
        // The source shares Model_S; with --federated the targets share their tails too.
        let cfg = site_toml(&root, &pki, &addr, s, s == &source || a.federated)?;
        let threads = if s == &source { cores } else { target_threads };
        let child = Command::new(&agent_bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RAYON_NUM_THREADS", threads.to_string())
            .stdout(Stdio::null())
            .stderr(log_file(&root.join("logs"), s)?)
            .spawn()
            .with_context(|| format!("starting {}", agent_bin.display()))?;
        agents.push(Proc { child });
    }
    say(&format!("{} site agents started (logs in {})", agents.len(), root.join("logs").display()));

    // 4. The study lead: approve the sites once they said hello, create the study, run it.
    let conn = Conn {
        coordinator: format!("https://{addr}"),
        bundle: pki.bundle_dir(Role::Admin, "lead"),
        server_name: "localhost".into(),
        json: false,
    };
    let mut admin = AdminClient::connect(&conn).await?;
    let all: Vec<String> = std::iter::once(source.clone()).chain(targets.iter().cloned()).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let seen = admin.list_sites(pb::ListSitesRequest {}).await?.sites;
        if all.iter().all(|s| seen.iter().any(|x| &x.name == s)) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "not every site agent connected within 2 minutes; see {}",
                root.join("logs").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for s in &all {
        admin.approve_site(pb::SiteRequest { name: s.clone(), reinstate: false }).await?;
    }
    say("sites connected and approved");
    let study = "npc-oar".to_owned();
    admin
        .create_study(pb::CreateStudyRequest {
            name: study.clone(),
            base_model: String::new(),
            sites: all.clone(),
        })
        .await?;
    let opts = TemplateOptions {
        trainable_layers: vec![sizes.trainable_layers],
        epochs: sizes.epochs,
        finetune_epochs: sizes.finetune_epochs,
        learning_rate: sizes.lr,
        finetune_learning_rate: sizes.lr,
        batch_size: sizes.batch,
        seed: a.seed,
        config: sizes.config.into(),
        ..Default::default()
    };
    let mut rounds = vec![(Template::Transfer, opts.clone())];
    if a.sweeps {
        rounds.push((
            Template::Sweep,
            TemplateOptions { trainable_layers: sizes.sweep_layers.clone(), ..opts.clone() },
        ));
        rounds.push((
            Template::CasesSweep,
            TemplateOptions { train_cases: sizes.sweep_cases.clone(), ..opts.clone() },
        ));
    }
    let series = format!("demo-{}", a.seed);
    for (t, o) in &rounds {
        let spec = templates::target_spec(*t, o).map_err(anyhow::Error::msg)?;
        let source_spec = templates::source_spec(o, sizes.source_epochs);
        // The first round's source trains and uploads Model_S, which becomes the study's
        // base model; later rounds reuse it (the source site runs no arms), except the
        // replicates of the transfer study, each of which trains its own.
        let n = if *t == Template::Transfer { replicates } else { 1 };
        let mut ids = Vec::new();
        for i in 0..n {
            let (spec, source_spec) = if n > 1 {
                templates::replicate(&spec, Some(&source_spec), i, n, &series)
            } else {
                (spec.clone(), Some(source_spec.clone()))
            };
            let r = admin
                .start_round(pb::StartRoundRequest {
                    study: study.clone(),
                    spec: Some(spec),
                    source_site: source.clone(),
                    source_spec,
                    ..Default::default()
                })
                .await?;
            let what = if n > 1 {
                format!("{} replicate {} of {n}", t.as_str(), i + 1)
            } else {
                t.as_str().to_owned()
            };
            say(&format!("round {} ({what}) started", r.round_id));
            ids.push((r.round_id, what));
        }
        for (id, what) in ids {
            finish(&mut admin, &id, &what, &root, &say).await?;
        }
    }
    if a.federated {
        // FedAvg of the targets' tails over Model_S (the study's base), then the matrix.
        let fo = TemplateOptions { epochs: sizes.fed_epochs, ..opts.clone() };
        let fed = FedOptions { rounds: sizes.fed_rounds, ..Default::default() };
        let spec = templates::fedavg_spec(&fo, fed).map_err(anyhow::Error::msg)?;
        for (spec, sites, what) in [
            (spec, targets.clone(), "fedavg"),
            (templates::cross_eval_spec(), all.clone(), "cross-eval"),
        ] {
            let r = admin
                .start_round(pb::StartRoundRequest {
                    study: study.clone(),
                    spec: Some(spec),
                    sites,
                    ..Default::default()
                })
                .await?;
            say(&format!("round {} ({what}) started", r.round_id));
            finish(&mut admin, &r.round_id, what, &root, &say).await?;
        }
    }

    // 5. The report.
    let results = admin.get_study_results(pb::StudyRequest { name: study.clone() }).await?;
    let rep = report::build(&results);
    let dir = match &a.out {
        Some(_) => root.join("report"),
        None => PathBuf::from("fedtune-demo-report"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (f, ext) in
        [(Format::Html, "html"), (Format::Json, "json"), (Format::Csv, "csv"), (Format::Md, "md")]
    {
        let path = dir.join(format!("report.{ext}"));
        std::fs::write(&path, report::render(&rep, f))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    say(&format!("report written to {}/report.{{html,json,csv,md}}", dir.display()));
    Ok(rep)
}
