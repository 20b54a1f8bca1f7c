//! Scale benchmarks against the real `coordinator serve` on loopback with mutual TLS:
//!
//! ```text
//! cargo build --release -p coordinator -p tests
//! target/release/scale agents --count 1000     # lease dispatch, heartbeats, CPU, memory
//! target/release/scale fanout --mb 200 --agents 1,10,50
//! target/release/scale resume --mb 200 --cuts 20
//! ```
//!
//! Each prints a Markdown table with the machine, the command and what it measured; the
//! numbers in `bench/RESULTS.md` come from these runs. `.ci/run` runs a smoke size of each.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use proto::pb;
use tests::scale::{Bench, percentile, weights_file};

#[derive(Debug, Parser)]
#[command(about = "fedtune scale benchmarks (coordinator process, loopback mTLS)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// N simulated agents (`site-agent simulate`'s agents) take one evaluate task each:
    /// task creation to lease, heartbeats, coordinator CPU and memory.
    Agents {
        #[arg(long)]
        count: usize,
        /// Each task's fake work, milliseconds.
        #[arg(long, default_value_t = 10_000)]
        workload_ms: u64,
        /// Heartbeat interval while working, milliseconds.
        #[arg(long, default_value_t = 1_000)]
        heartbeat_ms: u64,
    },
    /// A model of about MB megabytes downloaded by 1, 10, 50 agents at once, beside a file
    /// read and raw TLS copies on loopback.
    Fanout {
        #[arg(long, default_value_t = 200)]
        mb: u64,
        #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
        agents: Vec<usize>,
    },
    /// One agent's download cut at random points and resumed (the agent's own code).
    Resume {
        #[arg(long, default_value_t = 200)]
        mb: u64,
        #[arg(long, default_value_t = 20)]
        cuts: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned)))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores available")
}

fn header(what: &str) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("### {what}\n");
    println!("Machine: {}. Command: `scale {}`.\n", machine(), args.join(" "));
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Agents { count, workload_ms, heartbeat_ms } => {
                agents(count, workload_ms, heartbeat_ms).await
            }
            Command::Fanout { mb, agents } => fanout(mb, &agents).await,
            Command::Resume { mb, cuts, seed } => resume(mb, cuts, seed).await,
        }
    })
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

async fn agents(count: usize, workload_ms: u64, heartbeat_ms: u64) -> Result<()> {
    header(&format!("{count} agents on one coordinator"));
    let setup = Instant::now();
    let mut bench = Bench::start(count, 120).await?;
    let (model, _) = weights_file(&bench.root, 0)?;
    let opts = bench.agents(
        count,
        Duration::from_millis(workload_ms),
        Duration::from_millis(heartbeat_ms),
        false,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sim = tokio::spawn(site_agent::simulate::run(opts, async move {
        let _ = stopped.await;
    }));
    eprintln!("coordinator started; approving {count} sites");
    bench.approve(count).await?;
    eprintln!("approved; pushing the model");
    bench.study("scale", &model).await?;
    eprintln!("study made; starting the round");
    let setup_s = setup.elapsed().as_secs_f64();
    // Every agent is now long-polling.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mem = bench.watch_memory();
    let cpu0 = bench.cpu_seconds();
    let t0 = Instant::now();
    let (round, sent_ms) = bench.evaluate_round("scale", count).await?;
    let answered_ms = tests::scale::now_ms();
    eprintln!("round {round} started");
    let info = bench.wait_round(&round, Duration::from_secs(600)).await?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = bench.cpu_seconds() - cpu0;
    let peak = mem.peak();
    let _ = stop.send(());
    let report = sim.await?;
    let lat: Vec<f64> = report
        .leases
        .iter()
        .filter(|l| l.round_id == round)
        .map(|l| (l.received_unix_ms - sent_ms) as f64)
        .collect();
    let done = info.tasks.iter().filter(|t| t.state == pb::TaskState::Succeeded as i32).count();
    println!("| measure | value |\n|---|---|");
    println!("| agents (one mTLS connection and certificate each) | {count} |");
    println!("| setup: certificates, start, {count} hellos and approvals | {setup_s:.1} s |");
    println!("| tasks leased / succeeded | {} / {done} |", lat.len());
    println!(
        "| StartRound sent to lease, p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |",
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        percentile(&lat, 100.0)
    );
    println!(
        "| StartRound ({count} tasks planned, committed, flushed) answered after | {} ms |",
        answered_ms - sent_ms
    );
    println!(
        "| heartbeats ({heartbeat_ms} ms apart while working {workload_ms} ms) | {} in {wall:.1} s = {:.0}/s |",
        report.heartbeats,
        report.heartbeats as f64 / wall
    );
    println!(
        "| heartbeat round trip, p50 / p99 | {:.1} / {:.1} ms |",
        percentile(&report.heartbeat_ms, 50.0),
        percentile(&report.heartbeat_ms, 99.0)
    );
    println!(
        "| coordinator CPU during the round | {cpu:.1} s in {wall:.1} s = {:.2} cores |",
        cpu / wall
    );
    println!(
        "| coordinator memory (RSS) before / peak | {:.0} / {:.0} MiB |",
        mib(mem.start),
        mib(peak)
    );
    println!("| errors | {} |", report.errors.len());
    for e in report.errors.iter().take(5) {
        println!("\nerror: {e}");
    }
    if done != count || !report.errors.is_empty() {
        bail!("{done} of {count} tasks succeeded, {} errors", report.errors.len());
    }
    Ok(())
}

/// Reads `path` a MiB at a time; returns bytes per second.
fn read_rate(path: &std::path::Path) -> Result<f64> {
    use std::io::Read;
    let t = Instant::now();
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

async fn fanout(mb: u64, counts: &[usize]) -> Result<()> {
    header(&format!("Fan-out of a {mb} MB model"));
    let most = counts.iter().copied().max().context("--agents")?;
    let mut bench = Bench::start(most, 600).await?;
    let (model, size) = weights_file(&bench.root, mb)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hello = tokio::spawn(site_agent::simulate::run(
        bench.agents(most, Duration::ZERO, Duration::from_secs(5), false),
        async move {
            let _ = stopped.await;
        },
    ));
    bench.approve(most).await?;
    let _ = stop.send(());
    hello.await?;
    bench.study("fanout", &model).await?;
    // The coordinator hashes a blob again when it is fetched within a second of being
    // written; let that pass so the first phase measures the transfer only.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let file_rate = read_rate(&model)?;
    println!("Model: {size} bytes. Reading the file: {:.0} MiB/s.\n", mib(file_rate as u64));
    println!(
        "| agents | aggregate | per agent, mean time | raw TLS copies, aggregate | ratio | coordinator RSS before / peak / growth |"
    );
    println!("|---|---|---|---|---|---|");
    for &n in counts {
        let raw = tests::scale::raw_tls(&bench, &model, n).await?;
        let mem = bench.watch_memory();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let opts = bench.agents(n, Duration::ZERO, Duration::from_secs(5), true);
        let sim = tokio::spawn(site_agent::simulate::run(opts, async move {
            let _ = stopped.await;
        }));
        let (round, _) = bench.evaluate_round("fanout", n).await?;
        let info = bench.wait_round(&round, Duration::from_secs(900)).await?;
        let peak = mem.peak();
        let _ = stop.send(());
        let report = sim.await?;
        let fetched: Vec<_> = report.leases.iter().filter(|l| l.round_id == round).collect();
        if fetched.len() != n
            || fetched.iter().any(|l| l.fetched_bytes != size)
            || !report.errors.is_empty()
        {
            bail!(
                "{} of {n} agents fetched the whole model; errors: {:?}; {info:?}",
                fetched.len(),
                report.errors
            );
        }
        let start = fetched.iter().map(|l| l.fetch_start_unix_ms).min().unwrap_or(0);
        let end = fetched
            .iter()
            .map(|l| l.fetch_start_unix_ms + (l.fetch_seconds * 1e3) as i64)
            .max()
            .unwrap_or(0);
        let span = ((end - start) as f64 / 1e3).max(1e-3);
        let aggregate = (n as u64 * size) as f64 / span;
        let mean = fetched.iter().map(|l| l.fetch_seconds).sum::<f64>() / n as f64;
        println!(
            "| {n} | {:.0} MiB/s | {mean:.2} s | {:.0} MiB/s | {:.2} | {:.0} / {:.0} / {:.0} MiB |",
            mib(aggregate as u64),
            mib(raw as u64),
            aggregate / raw,
            mib(mem.start),
            mib(peak),
            mib(peak.saturating_sub(mem.start))
        );
    }
    Ok(())
}

async fn resume(mb: u64, cuts: usize, seed: u64) -> Result<()> {
    use rand::{Rng, SeedableRng};
    header(&format!("Resumed download of a {mb} MB model, {cuts} cuts"));
    let mut bench = Bench::start(1, 600).await?;
    let (model, size) = weights_file(&bench.root, mb)?;
    let mut link = tests::scale::site_link(&bench, 0).await?;
    link.hello(pb::HelloRequest::default()).await?;
    bench.approve(1).await?;
    bench.study("resume", &model).await?;
    let (round, _) = bench.evaluate_round("resume", 1).await?;
    let task = link.next_task(10).await?.context("a task")?;
    let m = task.base.context("a base model")?;
    let dir = bench.root.join("cache");
    let part = dir.join(format!("{}.part", m.sha256));
    // The cut points, uniform over the file: each download is cut at the next one past
    // what the agent has kept.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut points: Vec<u64> = (0..cuts).map(|_| rng.random_range(1..size)).collect();
    points.sort_unstable();
    let mut points = points.into_iter();
    let (mut cuts_made, mut kept_total) = (0, 0u64);
    loop {
        let before = std::fs::metadata(&part).map_or(0, |m| m.len());
        let cut = points.by_ref().find(|p| *p > before).map(|p| p - before);
        match link.fetch_model(&m, &dir, cut, &mut |_, _| {}).await {
            Ok((_, received)) => {
                kept_total += received;
                break;
            }
            Err(site_agent::agent::CallError::Interrupted(_)) => {
                cuts_made += 1;
                kept_total += std::fs::metadata(&part).map_or(0, |m| m.len()) - before;
            }
            Err(e) => return Err(e.into()),
        }
    }
    drop(link);
    // The coordinator counts the bytes each download stream read from disk and queued for
    // the connection when the stream ended.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info =
        bench.admin.get_round(pb::RoundRequest { round_id: round.clone() }).await?.into_inner();
    let sent = info.tasks.first().map_or(0, |t| t.bytes_down);
    let again = sent.saturating_sub(size);
    println!("| measure | value |\n|---|---|");
    println!(
        "| model | {size} bytes ({:.1} MiB chunks: {}) |",
        mib(proto::limits::CHUNK_BYTES as u64),
        size.div_ceil(proto::limits::CHUNK_BYTES as u64)
    );
    println!("| cuts (points uniform over the file, seed {seed}) | {cuts_made} |");
    println!(
        "| bytes the agent received in all | {kept_total} ({} received twice) |",
        kept_total.saturating_sub(size)
    );
    println!("| bytes the coordinator read and queued in all | {sent} |");
    println!(
        "| queued beyond the model, per cut | {:.0} bytes = {:.2} chunks |",
        again as f64 / cuts_made.max(1) as f64,
        again as f64 / cuts_made.max(1) as f64 / proto::limits::CHUNK_BYTES as f64
    );
    Ok(())
}
