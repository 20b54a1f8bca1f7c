//! Faults with real processes: a site agent killed (SIGKILL) in the middle of a download (of a
//! model of two chunks: the restarted agent resumes it), of training and of a submission. The
//! task is leased again (after training, only once its lease has expired), completes on the
//! restarted agent, and its result is counted once.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use proto::pb;
use tests::federation::Federation;

type R = anyhow::Result<()>;

/// `site-agent run` for `site` as a process, stopping at `pause` (see
/// `site_agent::agent::faults`) when given.
fn agent(fed: &Federation, site: &str, pause: Option<&str>) -> anyhow::Result<Child> {
    fed.site_config(site)?; // writes root/<site>.toml
    let mut cmd = Command::new(tests::bin("site-agent")?);
    cmd.args(["--quiet", "run", "--config"])
        .arg(fed.root.join(format!("{site}.toml")))
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(
            fed.root.join(format!("{site}-{}.log", pause.unwrap_or("clean"))),
        )?));
    if let Some(p) = pause {
        cmd.env("FEDTUNE_TEST_PAUSE_AT", p).env("FEDTUNE_TEST_PAUSE_DIR", &fed.root);
    }
    Ok(cmd.spawn()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_download_training_or_submission_loses_nothing() -> R {
    let fed = Federation::builder().sites(1).without_agents().start().await?;
    fed.study("kill", "tiny").await?;
    // The download is cut inside a model of several chunks, so the restarted agent resumes it.
    fed.study("kill-big", "small").await?;
    let big = std::fs::metadata(fed.base_model("small")?)?.len();
    assert!(big > proto::limits::CHUNK_BYTES as u64, "the small model is {big} bytes");
    let mut survived = Vec::new();
    for point in ["download", "train", "submit"] {
        let study = if point == "download" { "kill-big" } else { "kill" };
        let round = fed
            .start_round(
                study,
                pb::TaskSpec {
                    kind: pb::TaskKind::Finetune as i32,
                    trainable_layers: 2,
                    epochs: 1,
                    ..Default::default()
                },
            )
            .await?;
        // Start, wait until the agent stands at the point, kill it there.
        let mut child = agent(&fed, "site-a", Some(point))?;
        let marker = fed.root.join(point);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !marker.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent never reached {point} (a site-agent built without the test-hooks \
                 feature? `cargo test --workspace` builds it with them)"
            );
            if let Some(status) = child.try_wait()? {
                panic!("the agent exited ({status}) before {point}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        child.kill()?; // SIGKILL
        child.wait()?;
        std::fs::remove_file(&marker)?;
        if point == "train" {
            // No agent of the site asks again: the lease (6 s here) expires and the task is
            // pending once more, to be leased anew (not re-handed on the site's next poll).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let info = fed.round(&round).await?;
                if info.tasks[0].state == pb::TaskState::Pending as i32 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the lease never expired: {info:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // A clean agent takes over.
        let mut clean = agent(&fed, "site-a", None)?;
        let info = fed.wait_round(&round, 180).await;
        clean.kill()?;
        clean.wait()?;
        let info = info?;
        assert_eq!(
            info.state,
            pb::RoundState::Completed as i32,
            "after a kill at {point}: {info:?}"
        );
        let task = info.tasks.first().expect("the task");
        assert_eq!(task.attempt, 2, "{point}: the killed lease expired and the task ran again");
        let results = fed.results(&round).await?;
        assert_eq!(results.results.len(), 1, "{point}: one result, counted once");
        let res = results.results[0].result.as_ref().expect("result");
        assert_eq!(res.arms.last().map(|a| a.epoch_losses.len()), Some(1));
        if point == "download" {
            // The clean agent asked for the rest of the model, not for all of it again.
            let (entries, _) = site_agent::agent::audit::AuditLog::read(&fed.storage("site-a"))?;
            let offsets: Vec<u64> = entries
                .iter()
                .filter(|e| e.rpc.ends_with("/FetchModel"))
                .filter_map(|e| {
                    use prost::Message;
                    pb::FetchModelRequest::decode(e.message().as_slice()).ok().map(|r| r.offset)
                })
                .collect();
            assert!(offsets.iter().any(|&o| o > 0), "no resumed download: offsets {offsets:?}");
        }
        survived.push(point);
    }
    eprintln!("agent killed at {survived:?}: every task completed, each result counted once");
    fed.shutdown().await
}

/// Where a round stood when the coordinator was killed.
fn phase_of(round: Option<&pb::RoundInfo>) -> &'static str {
    let Some(r) = round else { return "registration" };
    if r.state == pb::RoundState::Completed as i32 {
        return "completion";
    }
    let states: Vec<i32> = r.tasks.iter().map(|t| t.state).collect();
    let phase = |name: &str| {
        r.tasks.iter().any(|t| {
            t.state == pb::TaskState::Leased as i32
                && t.progress.as_ref().is_some_and(|p| p.phase.contains(name))
        })
    };
    if states.contains(&(pb::TaskState::Succeeded as i32)) {
        "submission"
    } else if phase("train") || phase("cache") || phase("evaluate") {
        "training"
    } else if states.contains(&(pb::TaskState::Leased as i32)) {
        "download"
    } else {
        "registration"
    }
}

/// The coordinator process is killed (SIGKILL) and restarted at seeded moments of two rounds
/// with three agents: while they register, download, train, submit and after completion.
/// At least 12 kills, and more until each of those five phases was hit. Every round completes,
/// with one result per site, and a result seen before a kill is the same after it.
/// `FEDTUNE_FAULT_SEED` picks other moments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_killed_at_seeded_points_loses_nothing() -> R {
    use rand::{Rng, SeedableRng};
    let seed = std::env::var("FEDTUNE_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut fed =
        Federation::builder().sites(3).coordinator_process().without_agents().start().await?;
    for s in ["site-a", "site-b", "site-c"] {
        fed.start_agent(s)?;
    }
    let mut phases: Vec<&str> = Vec::new();
    // Registration: the agents' first Hellos.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        fed.restart_coordinator().await?;
        phases.push("registration");
    }
    fed.study("kills", "tiny").await?;
    let spec = pb::TaskSpec {
        kind: pb::TaskKind::Finetune as i32,
        trainable_layers: 3,
        epochs: 4,
        ..Default::default()
    };
    let mut rounds: Vec<String> = Vec::new();
    let mut seen: std::collections::BTreeMap<(String, String), pb::TaskResult> = Default::default();
    const ALL: [&str; 5] = ["registration", "download", "training", "submission", "completion"];
    // At least 12 kills, and on until every phase was hit (at most 40).
    while phases.len() < 12 || !ALL.iter().all(|p| phases.contains(p)) {
        assert!(phases.len() < 40, "seed {seed}: phases not all reached: {phases:?}");
        let need_round = match rounds.last() {
            None => true,
            // A completed round is killed once in that state before the next one starts.
            Some(r) => {
                rounds.len() < 8
                    && phases.contains(&"completion")
                    && fed.round(r).await?.state == pb::RoundState::Completed as i32
            }
        };
        if need_round {
            let r = fed.start_round("kills", spec.clone()).await?;
            rounds.push(r);
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..900))).await;
        let current = rounds.last().expect("a round");
        let mut info = fed.round(current).await?;
        // After the seeded kills, the phases not yet hit are waited for (a slow machine can
        // train between two random moments every time): the round is watched until it
        // reaches one of them, or ends.
        if phases.len() >= 12 {
            let missing: Vec<&str> = ALL.iter().copied().filter(|p| !phases.contains(p)).collect();
            let until = tokio::time::Instant::now() + Duration::from_secs(60);
            while !missing.contains(&phase_of(Some(&info)))
                && info.state != pb::RoundState::Completed as i32
                && tokio::time::Instant::now() < until
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
                info = fed.round(current).await?;
            }
        }
        // Results recorded so far, to compare after the restart.
        for r in &rounds {
            let res = fed.results(r).await?;
            for x in res.results {
                if let Some(tr) = x.result {
                    seen.insert((r.clone(), x.site), tr);
                }
            }
        }
        fed.restart_coordinator().await?;
        phases.push(phase_of(Some(&info)));
    }
    for r in &rounds {
        let info = fed.wait_round(r, 300).await?;
        assert_eq!(info.state, pb::RoundState::Completed as i32, "{info:?}");
        let res = fed.results(r).await?;
        let mut sites: Vec<&str> = res.results.iter().map(|x| x.site.as_str()).collect();
        sites.sort();
        assert_eq!(sites, ["site-a", "site-b", "site-c"], "one result per site, once");
        for x in &res.results {
            if let Some(before) = seen.get(&(r.clone(), x.site.clone())) {
                assert_eq!(x.result.as_ref(), Some(before), "a result changed across a kill");
            }
        }
    }
    let mut count: std::collections::BTreeMap<&str, usize> = Default::default();
    for p in &phases {
        *count.entry(p).or_default() += 1;
    }
    eprintln!(
        "coordinator killed at {} points (seed {seed}), all survived: {count:?}; {} rounds completed",
        phases.len(),
        rounds.len()
    );
    fed.shutdown().await
}

/// The coordinator's blob store made unwritable (its `tmp` folder replaced by a file; the
/// tests run as root, where permissions would not stop a write): an upload fails with a
/// status that says the coordinator cannot write, the server keeps answering, what was stored
/// before is intact, and uploads work again once the folder is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_data_dir_fails_uploads_clearly_and_damages_nothing() -> R {
    let fed = Federation::builder().sites(1).without_agents().start().await?;
    let info = fed.study("disk", "tiny").await?;
    let base = info.base.expect("the study's base model");
    let blobs = fed.data_dir.join("blobs");
    let stored = std::fs::read(blobs.join(&base.sha256))?;

    let tmp = blobs.join("tmp");
    std::fs::remove_dir_all(&tmp)?;
    std::fs::write(&tmp, b"not a folder")?;
    let other = fed.root.join("other.safetensors");
    let cfg = site_agent::model::ModelConfig::preset("tiny")?;
    let net = site_agent::model::Net::new(
        &cfg,
        &site_agent::data::phantom::organ_map(),
        99,
        &candle_core::Device::Cpu,
    )?;
    site_agent::weights::save(&net, &Default::default(), &other)?;
    let mut admin = fed.admin().await?;
    let err = coordinator::lead::push_model(&mut admin, &other, "other", false)
        .await
        .expect_err("the upload cannot be stored");
    let msg = format!("{err:#}");
    assert!(msg.contains("cannot write its data"), "{msg}");

    // Still serving; the stored model and the study are as they were.
    let models = admin.list_models(pb::ListModelsRequest {}).await?.into_inner().models;
    assert_eq!(models.len(), 1, "nothing half-stored: {models:?}");
    assert_eq!(std::fs::read(blobs.join(&base.sha256))?, stored);
    let studies = admin.list_studies(pb::ListStudiesRequest {}).await?.into_inner().studies;
    assert_eq!(studies.len(), 1);

    // Writable again: the same upload goes through.
    std::fs::remove_file(&tmp)?;
    coordinator::lead::push_model(&mut admin, &other, "other", false).await?;
    assert_eq!(admin.list_models(pb::ListModelsRequest {}).await?.into_inner().models.len(), 2);
    fed.shutdown().await
}

/// A TCP proxy between the agents and the coordinator that the test can cut (close every
/// connection and refuse new ones) or stall (keep connections open, forward nothing).
struct Proxy {
    addr: std::net::SocketAddr,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

const PASS: u8 = 0;
const CUT: u8 = 1;
const STALL: u8 = 2;

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(PASS));
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> =
            Default::default();
        let (m, c) = (mode.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                if m.load(Ordering::SeqCst) == CUT {
                    drop(down);
                    continue;
                }
                let m = m.clone();
                let task = tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(upstream).await else { return };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    let pump =
                        |m: std::sync::Arc<std::sync::atomic::AtomicU8>,
                         mut r: tokio::net::tcp::OwnedReadHalf,
                         mut w: tokio::net::tcp::OwnedWriteHalf| async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut buf = vec![0u8; 16 * 1024];
                            loop {
                                let n = match r.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                while m.load(Ordering::SeqCst) == STALL {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                if m.load(Ordering::SeqCst) == CUT
                                    || w.write_all(&buf[..n]).await.is_err()
                                {
                                    return;
                                }
                            }
                        };
                    let a = tokio::spawn(pump(m.clone(), dr, uw));
                    let b = pump(m, ur, dw);
                    b.await;
                    a.abort();
                });
                c.lock().expect("conns").push(task);
            }
        });
        Ok(Self { addr, mode, conns })
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::SeqCst);
        if mode == CUT {
            for t in self.conns.lock().expect("conns").drain(..) {
                t.abort();
            }
        }
    }
}

/// The network between an agent and the coordinator is cut, then stalled, while the agent
/// trains: the agent reconnects on its own, and its heartbeats keep the lease through training
/// longer than the lease (a break shorter than the lease loses nothing: the task completes on
/// its first attempt). A cut longer than the lease lets the lease expire; the task still
/// completes once the network is back, and its result is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_recover_from_a_cut_or_stalled_network_by_themselves() -> R {
    // Every idle bound is shorter than the training: the coordinator pings each connection
    // every second and drops one that does not answer within a second, and no call or stream
    // may idle for more than 2 s. Only heartbeats keep the lease (6 s).
    let mut fed = Federation::builder()
        .sites(1)
        .without_agents()
        .limits(|l| {
            l.keepalive_seconds = 1;
            l.idle_seconds = 2;
        })
        .start()
        .await?;
    fed.study("net", "tiny").await?;
    let proxy = Proxy::start(fed.addr).await?;
    let mut cfg = fed.site_config("site-a")?;
    cfg.coordinator.address = format!("https://{}", proxy.addr);
    cfg.policy.max_epochs = 1000;
    fed.start_agent_with("site-a", cfg)?;
    let spec = pb::TaskSpec {
        kind: pb::TaskKind::Finetune as i32,
        trainable_layers: 2,
        // Long enough (5 to 12 s at 150 epochs on 2-core VMs) to outlast the lease and every
        // idle bound.
        epochs: 300,
        ..Default::default()
    };
    // (mode, seconds, the attempts that may complete it). The harness's lease is 6 s: a short
    // break keeps the lease; after a long one the task is either leased again (attempt 2) or,
    // when training ended during the cut and nobody else took the task, the waiting result of
    // attempt 1 is accepted on reconnection. Either way once.
    for (mode, secs, attempts) in [(CUT, 2, 1..=1), (STALL, 2, 1..=1), (CUT, 9, 1..=2)] {
        let round = fed.start_round("net", spec.clone()).await?;
        // Wait for training, then break the network for `secs`.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let info = fed.round(&round).await?;
            if phase_of(Some(&info)) == "training" {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no training seen: {info:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let training = std::time::Instant::now();
        proxy.set(mode);
        tokio::time::sleep(Duration::from_secs(secs)).await;
        proxy.set(PASS);
        let info = fed.wait_round(&round, 180).await?;
        let took = training.elapsed();
        eprintln!(
            "network {} for {secs} s: the task completed {:.1} s after training was seen",
            if mode == CUT { "cut" } else { "stalled" },
            took.as_secs_f64()
        );
        assert_eq!(info.state, pb::RoundState::Completed as i32, "{info:?}");
        let task = info.tasks.first().expect("the task");
        assert!(attempts.contains(&task.attempt), "mode {mode} for {secs} s: {task:?}");
        if secs < 6 {
            // Training outlasted the 6 s lease and the 1 s keepalive, on its first lease.
            assert!(took > Duration::from_secs(6), "training took only {took:?}");
        }
        let results = fed.results(&round).await?;
        assert_eq!(results.results.len(), 1, "counted once");
    }
    fed.shutdown().await
}
