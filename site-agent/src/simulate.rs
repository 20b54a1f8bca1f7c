//! `site-agent simulate`: many light agents in one process against one coordinator, for
//! load tests. Each speaks the real protocol over its own mutual-TLS connection with its own
//! site certificate: hello (again every half second until approved), long polls, optionally
//! downloads the task's models (bytes counted and dropped), heartbeats while it "works" for a
//! fixed time, and submits a fixed result. The work is fake and says so: an evaluate task's
//! one base arm with a Dice of 0.5 for one organ ("simulated"); any other kind of task is
//! answered with failure code INTERNAL. No data, audit log or model is read or kept.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::limits;
use proto::pb::{self, site_service_client::SiteServiceClient};
use serde::Serialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// What the simulated agents do.
#[derive(Clone, Debug)]
pub struct Options {
    /// `https://host:port`.
    pub coordinator: String,
    /// The name in the coordinator's certificate.
    pub server_name: String,
    /// One site bundle (ca.pem, cert.pem, key.pem) per agent.
    pub bundles: Vec<PathBuf>,
    /// How long each task "runs" before its result.
    pub workload: Duration,
    /// Heartbeat interval while a task runs.
    pub heartbeat: Duration,
    /// Download each task's models (bytes counted, not kept).
    pub fetch: bool,
    /// Long-poll wait asked for.
    pub poll_seconds: u32,
}

/// One task an agent received.
#[derive(Clone, Debug, Serialize)]
pub struct Lease {
    pub site: String,
    pub task_id: String,
    pub round_id: String,
    /// When the task arrived, Unix milliseconds.
    pub received_unix_ms: i64,
    /// Downloads: bytes and seconds from the first request to the last byte.
    pub fetched_bytes: u64,
    pub fetch_seconds: f64,
    /// When the download began, Unix milliseconds (0: none).
    pub fetch_start_unix_ms: i64,
}

/// What the agents did, for the caller to summarise.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub agents: usize,
    pub leases: Vec<Lease>,
    pub heartbeats: u64,
    /// Each heartbeat's round trip, milliseconds.
    pub heartbeat_ms: Vec<f64>,
    pub results: u64,
    /// Every call that failed, as "RPC: status" (an agent retries after a second).
    pub errors: Vec<String>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn connect(
    opts: &Options,
    bundle: &std::path::Path,
) -> anyhow::Result<SiteServiceClient<Channel>> {
    use anyhow::Context;
    let read = |f: &str| {
        let p = bundle.join(f);
        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(read("cert.pem")?, read("key.pem")?))
        .domain_name(opts.server_name.clone());
    let channel = Channel::from_shared(opts.coordinator.clone())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", opts.coordinator))?;
    Ok(SiteServiceClient::new(channel)
        .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(limits::MAX_MESSAGE_BYTES))
}

/// Runs one agent per bundle until `stop` resolves; returns what they did.
pub async fn run(opts: Options, stop: impl Future<Output = ()>) -> Report {
    let report = Arc::new(Mutex::new(Report { agents: opts.bundles.len(), ..Default::default() }));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut agents = tokio::task::JoinSet::new();
    for bundle in opts.bundles.clone() {
        let (opts, report, rx) = (opts.clone(), report.clone(), rx.clone());
        agents.spawn(async move { agent(opts, bundle, report, rx).await });
    }
    stop.await;
    let _ = tx.send(true);
    while agents.join_next().await.is_some() {}
    report.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn error(report: &Mutex<Report>, rpc: &str, e: impl std::fmt::Display) {
    let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
    if r.errors.len() < 1000 {
        r.errors.push(format!("{rpc}: {e}"));
    }
}

async fn agent(
    opts: Options,
    bundle: PathBuf,
    report: Arc<Mutex<Report>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let stopped = |s: &tokio::sync::watch::Receiver<bool>| *s.borrow();
    let retry = Duration::from_secs(1);
    let mut client = loop {
        match connect(&opts, &bundle).await {
            Ok(c) => break c,
            Err(e) => error(&report, "connect", format!("{e:#}")),
        }
        if stopped(&stop) {
            return;
        }
        tokio::time::sleep(retry).await;
    };
    let site = loop {
        match client.hello(pb::HelloRequest::default()).await {
            Ok(r) if r.get_ref().approved => break r.into_inner().site,
            Ok(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            Err(e) => {
                error(&report, "Hello", e.message());
                tokio::time::sleep(retry).await;
            }
        }
        if stopped(&stop) {
            return;
        }
    };
    while !stopped(&stop) {
        let poll = client.next_task(pb::NextTaskRequest { wait_seconds: opts.poll_seconds });
        let task = tokio::select! {
            r = poll => r,
            _ = stop.changed() => return,
        };
        let task = match task {
            Ok(r) => match r.into_inner().task {
                Some(t) => t,
                None => continue,
            },
            Err(e) => {
                error(&report, "NextTask", e.message());
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        let mut lease = Lease {
            site: site.clone(),
            task_id: task.task_id.clone(),
            round_id: task.round_id.clone(),
            received_unix_ms: now_ms(),
            fetched_bytes: 0,
            fetch_seconds: 0.0,
            fetch_start_unix_ms: 0,
        };
        if opts.fetch {
            let started = Instant::now();
            lease.fetch_start_unix_ms = now_ms();
            for m in task.base.iter().chain(&task.tail) {
                match fetch(&mut client, m).await {
                    Ok(n) => lease.fetched_bytes += n,
                    Err(e) => error(&report, "FetchModel", e.message()),
                }
            }
            lease.fetch_seconds = started.elapsed().as_secs_f64();
        }
        report.lock().unwrap_or_else(|e| e.into_inner()).leases.push(lease);
        // The fake work, with heartbeats.
        let until = Instant::now() + opts.workload;
        let mut stop_task = false;
        while !stop_task && Instant::now() < until {
            let next = (Instant::now() + opts.heartbeat).min(until);
            tokio::time::sleep_until(next.into()).await;
            if Instant::now() >= until {
                break;
            }
            let sent = Instant::now();
            let hb = pb::HeartbeatRequest {
                task_id: task.task_id.clone(),
                attempt: task.attempt,
                progress: None,
            };
            match client.heartbeat(hb).await {
                Ok(r) => {
                    let mut rep = report.lock().unwrap_or_else(|e| e.into_inner());
                    rep.heartbeats += 1;
                    rep.heartbeat_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                    stop_task = r.get_ref().stop;
                }
                Err(e) => error(&report, "Heartbeat", e.message()),
            }
        }
        if stop_task {
            continue;
        }
        let outcome = if task.spec.as_ref().is_some_and(|s| s.kind == pb::TaskKind::Evaluate as i32)
        {
            pb::submit_result_request::Outcome::Result(fake_result(opts.workload))
        } else {
            pb::submit_result_request::Outcome::Failure(pb::FailureCode::Internal as i32)
        };
        let submit = pb::SubmitResultRequest {
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            outcome: Some(outcome),
            refusal_detail: String::new(),
        };
        match client.submit_result(submit).await {
            Ok(_) => report.lock().unwrap_or_else(|e| e.into_inner()).results += 1,
            Err(e) => error(&report, "SubmitResult", e.message()),
        }
    }
}

/// An evaluate task's result: the base arm, one organ, Dice 0.5, the workload as its time.
fn fake_result(workload: Duration) -> pb::TaskResult {
    pb::TaskResult {
        device: "cpu".into(),
        arms: vec![pb::ArmResult {
            spec: Some(pb::ArmSpec { kind: pb::ArmKind::Base as i32, ..Default::default() }),
            eval_seconds: workload.as_secs_f64(),
            scores: vec![pb::CaseScore {
                organ: "simulated".into(),
                dice: 0.5,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Downloads a model, counting its bytes; nothing is kept.
async fn fetch(
    client: &mut SiteServiceClient<Channel>,
    m: &pb::ModelRef,
) -> Result<u64, tonic::Status> {
    let req = pb::FetchModelRequest { sha256: m.sha256.clone(), offset: 0 };
    let mut stream = client.fetch_model(req).await?.into_inner();
    let mut n = 0u64;
    while let Some(chunk) = stream.message().await? {
        n += chunk.data.len() as u64;
    }
    Ok(n)
}
