//! The federation over real mTLS on 127.0.0.1: rounds, resumable downloads, a result
//! submitted twice, a coordinator restart in the middle of a round, and the site audit log.
//! What the coordinator refuses is in `refusals.rs`, what stock gRPC clients see in
//! `stock_clients.rs`.

use std::time::Duration;

use prost::Message;
use proto::pb;
use tests::federation::{Federation, site_link};
use tests::privacy::{assert_sends_none_of, site_secrets};

type R = anyhow::Result<()>;

/// Organs with a Dice in 0..1 for every row of the task's last arm (its own model).
fn organs_with_dice(r: &pb::TaskResult) -> usize {
    let rows = r.arms.last().map_or(&[][..], |a| &a.scores[..]);
    let mut organs: Vec<&str> = rows.iter().map(|c| c.organ.as_str()).collect();
    organs.dedup();
    organs.sort();
    organs.dedup();
    organs
        .into_iter()
        .filter(|o| rows.iter().filter(|c| c.organ == *o).all(|c| (0.0..=1.0).contains(&c.dice)))
        .count()
}

pub(crate) fn evaluate() -> pb::TaskSpec {
    pb::TaskSpec { kind: pb::TaskKind::Evaluate as i32, ..Default::default() }
}

fn finetune(k: u32, epochs: u32) -> pb::TaskSpec {
    pb::TaskSpec {
        kind: pb::TaskKind::Finetune as i32,
        trainable_layers: k,
        epochs,
        ..Default::default()
    }
}

/// Three sites run an evaluate round and a finetune round to completion; the results hold
/// per-organ Dice for every site. Then every message each agent sent is in its audit log, the
/// chain verifies, and no message names a case or a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_complete_evaluate_and_finetune_rounds() -> R {
    let fed = Federation::builder().sites(3).start().await?;
    fed.study("nasopharynx", "tiny").await?;
    for spec in [evaluate(), finetune(2, 1)] {
        let kind = spec.kind;
        let round = fed.start_round("nasopharynx", spec).await?;
        let info = fed.wait_round(&round, 240).await?;
        assert_eq!(info.state, pb::RoundState::Completed as i32, "{info:?}");
        let results = fed.results(&round).await?;
        assert_eq!(results.results.len(), 3, "one result per site");
        let mut sites: Vec<_> = results.results.iter().map(|r| r.site.clone()).collect();
        sites.sort();
        assert_eq!(sites, fed.sites);
        for r in &results.results {
            let res = r.result.as_ref().expect("result");
            assert_eq!(organs_with_dice(res), 9, "per-organ Dice from {}", r.site);
            let kinds: Vec<i32> =
                res.arms.iter().map(|a| a.spec.as_ref().map_or(0, |s| s.kind)).collect();
            if kind == pb::TaskKind::Finetune as i32 {
                // The base model scored on the same cases before fine-tuning, then the
                // fine-tuned model.
                assert_eq!(kinds, [pb::ArmKind::Base as i32, pb::ArmKind::Finetune as i32]);
                let (base, tuned) = (&res.arms[0], &res.arms[1]);
                assert_eq!(tuned.epoch_losses.len(), 1);
                assert_eq!(tuned.trainable_layers, 2);
                assert_eq!(
                    tuned.weights_sha256.len(),
                    64,
                    "fine-tuned weights stay at the site, named by hash"
                );
                let cases = |a: &pb::ArmResult| -> Vec<(String, u32)> {
                    a.scores.iter().map(|c| (c.organ.clone(), c.case_index)).collect()
                };
                assert_eq!(cases(base), cases(tuned), "the same organs and cases");
            } else {
                assert_eq!(kinds, [pb::ArmKind::Base as i32], "an evaluation scores one model");
            }
        }
    }
    // Each site's Hello said what it trains on (agent.device defaults to auto: the CPU in a
    // build without CUDA) and the machine's memory; every result names the same device.
    let listed = fed.admin().await?.list_sites(pb::ListSitesRequest {}).await?.into_inner();
    let want = if site_agent::device::cuda_built() { ["cpu", "cuda"].as_slice() } else { &["cpu"] };
    for s in &listed.sites {
        let c = s.capabilities.as_ref().expect("capabilities from the Hello");
        assert!(want.contains(&c.device.as_str()), "{}: {c:?}", s.name);
        assert!(c.memory_bytes > 0, "{}: the machine's memory: {c:?}", s.name);
        assert_eq!(c.gpu_name.is_empty(), c.device == "cpu", "{c:?}");
    }
    // The audit log: every RPC the agents make is there, the chain verifies, and nothing in
    // any message names a case or a file of the site.
    let mut fed = fed;
    for a in &mut fed.agents {
        a.stop().await?;
    }
    for site in &fed.sites {
        let (entries, _) = site_agent::agent::audit::AuditLog::read(&fed.storage(site))?;
        assert!(site_agent::agent::audit::verify(&entries).is_empty());
        let rpcs: std::collections::BTreeSet<_> =
            entries.iter().map(|e| e.rpc.rsplit('/').next().unwrap_or("").to_owned()).collect();
        // Heartbeats only when a task outlasts the heartbeat interval, so they are not required.
        for rpc in ["Hello", "NextTask", "FetchModel", "SubmitResult"] {
            assert!(rpcs.contains(rpc), "{site} audited no {rpc}: {rpcs:?}");
        }
        let submits = entries.iter().filter(|e| e.rpc.ends_with("SubmitResult")).count();
        assert_eq!(submits, 2, "{site}: one submission per round");
        assert_sends_none_of(site, &entries, &site_secrets(&fed.data_dir(site))?);
        for e in &entries {
            let bytes = e.message();
            // Each message decodes as the request type of its RPC, with no bytes left over.
            let ok = match e.rpc.rsplit('/').next().unwrap_or("") {
                "Hello" => pb::HelloRequest::decode(bytes.as_slice()).map(|m| m.encoded_len()).ok(),
                "NextTask" => {
                    pb::NextTaskRequest::decode(bytes.as_slice()).map(|m| m.encoded_len()).ok()
                }
                "FetchModel" => {
                    pb::FetchModelRequest::decode(bytes.as_slice()).map(|m| m.encoded_len()).ok()
                }
                "Heartbeat" => {
                    pb::HeartbeatRequest::decode(bytes.as_slice()).map(|m| m.encoded_len()).ok()
                }
                "SubmitResult" => {
                    pb::SubmitResultRequest::decode(bytes.as_slice()).map(|m| m.encoded_len()).ok()
                }
                _ => None,
            };
            assert_eq!(ok, Some(bytes.len()), "{site}: {} is not a clean request message", e.rpc);
        }
    }
    fed.shutdown().await
}

/// A download cut after its first chunk resumes from its offset: at most one chunk's worth
/// of bytes is sent twice, and the file verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_download_resumes_from_its_offset() -> R {
    let fed = Federation::builder().sites(1).without_agents().start().await?;
    // `small` weights are about 1.3 MB: more than one 1 MiB chunk.
    fed.study("resume", "small").await?;
    fed.start_round("resume", evaluate()).await?;
    let mut link = site_link(&fed, "site-a").await?;
    link.hello(pb::HelloRequest::default()).await?;
    let task = link.next_task(2).await?.expect("a task for site-a");
    let model = task.base.clone().expect("evaluate tasks carry their base model");
    assert!(model.size > proto::limits::CHUNK_BYTES as u64);
    let dir = fed.root.join("cache");
    let first = link.fetch_model(&model, &dir, Some(1), &mut |_, _| {}).await;
    assert!(matches!(first, Err(site_agent::agent::CallError::Interrupted(_))), "{first:?}");
    let part = std::fs::metadata(dir.join(format!("{}.part", model.sha256)))?.len();
    assert!(part > 0, "whole chunks received before the cut are kept");
    let (path, second) = link.fetch_model(&model, &dir, None, &mut |_, _| {}).await?;
    assert_eq!(second, model.size - part, "the second call starts at the kept offset");
    let resent = part + second - model.size;
    assert!(resent <= proto::limits::CHUNK_BYTES as u64, "{resent} bytes sent twice");
    let bytes = std::fs::read(&path)?;
    assert_eq!(site_agent::weights::sha256_hex(&bytes), model.sha256);
    fed.shutdown().await
}

/// A model altered by one byte is never loaded: a damaged kept part is found by its hash
/// and fetched again from the start; a damaged copy in the coordinator's store is never sent
/// (DataLoss), and the task fails with the download code instead of running on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_altered_by_one_byte_is_refetched_or_refused() -> R {
    let mut fed = Federation::builder().sites(1).without_agents().start().await?;
    fed.study("damage", "tiny").await?;
    fed.start_round("damage", evaluate()).await?;
    let mut link = site_link(&fed, "site-a").await?;
    link.hello(pb::HelloRequest::default()).await?;
    let task = link.next_task(2).await?.expect("a task for site-a");
    let model = task.base.clone().expect("evaluate tasks carry their base model");
    let good = std::fs::read(fed.data_dir.join("blobs").join(&model.sha256))?;

    // The site's kept part: the right length of the first bytes, one of them altered.
    let dir = fed.root.join("cache");
    std::fs::create_dir_all(&dir)?;
    let mut part = good[..good.len() / 2].to_vec();
    part[10] ^= 0x01;
    std::fs::write(dir.join(format!("{}.part", model.sha256)), &part)?;
    let (path, received) = link.fetch_model(&model, &dir, None, &mut |_, _| {}).await?;
    assert_eq!(received, model.size, "fetched again from the start");
    assert_eq!(std::fs::read(&path)?, good);
    assert!(!dir.join(format!("{}.part", model.sha256)).exists());

    // The coordinator's stored copy altered by one byte.
    let blob = fed.data_dir.join("blobs").join(&model.sha256);
    let mut bad = good.clone();
    bad[good.len() / 3] ^= 0x80;
    std::fs::write(&blob, &bad)?;
    let other = fed.root.join("cache2");
    let r = link.fetch_model(&model, &other, None, &mut |_, _| {}).await;
    match r {
        Err(site_agent::agent::CallError::Status(s)) => {
            assert_eq!(s.code(), tonic::Code::DataLoss, "{}", s.message());
            assert!(s.message().contains("push it again"), "{}", s.message());
        }
        other => panic!("a damaged stored model must be refused, got {other:?}"),
    }
    assert!(!other.join(&model.sha256).exists(), "nothing verified was written");

    // An agent given a task on the damaged model fails it with the download code.
    drop(link);
    let round = fed.start_round("damage", evaluate()).await?;
    fed.start_agent("site-a")?;
    let info = fed.wait_round(&round, 120).await?;
    assert_eq!(info.state, pb::RoundState::Failed as i32, "{info:?}");
    let t = info.tasks.first().expect("site-a's task");
    assert_eq!(t.state, pb::TaskState::Failed as i32, "{t:?}");
    assert!(t.reason.to_ascii_lowercase().contains("download"), "{}", t.reason);
    fed.shutdown().await
}

/// Damaged data at one site (a truncated label file of a test case): its agent names the
/// case in its own log, reports the task failed with a reason code and nothing that names a
/// case or a file, and the other site's result is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_data_at_one_site_fails_its_task_with_a_code_only() -> R {
    let mut fed = Federation::builder().sites(2).without_agents().start().await?;
    let manifest = site_agent::data::Manifest::load(&fed.data_dir("site-b").join("manifest.toml"))?;
    let case =
        manifest.cases_in(site_agent::data::Split::Test).next().expect("a test case").clone();
    let bytes = std::fs::read(&case.label)?;
    // An agent refuses to start on invalid data, naming the case, the file and check-data.
    std::fs::write(&case.label, &bytes[..bytes.len() / 3])?;
    let refused = site_agent::agent::run(fed.site_config("site-b")?, async {}).await;
    let e = refused.expect_err("invalid data at start").to_string();
    assert!(e.contains(&case.id) && e.contains("check-data"), "{e}");
    assert!(e.contains(&*case.label.to_string_lossy()), "{e}");
    // Damaged after the agent started (a file changed under it): the task fails with a code.
    std::fs::write(&case.label, &bytes)?;
    fed.start_agent("site-a")?;
    fed.start_agent("site-b")?;
    fed.study("bad-data", "tiny").await?;
    std::fs::write(&case.label, &bytes[..bytes.len() / 3])?;
    let round = fed
        .admin()
        .await?
        .start_round(pb::StartRoundRequest {
            study: "bad-data".into(),
            spec: Some(evaluate()),
            quorum: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .round_id;
    let info = fed.wait_round(&round, 240).await?;
    assert_eq!(info.state, pb::RoundState::Completed as i32, "quorum 1 is met: {info:?}");
    let task = |site: &str| info.tasks.iter().find(|t| t.site == site).expect("task").clone();
    assert_eq!(task("site-a").state, pb::TaskState::Succeeded as i32);
    let failed = task("site-b");
    assert_eq!(failed.state, pb::TaskState::Failed as i32, "{failed:?}");
    assert!(failed.reason.to_ascii_lowercase().contains("data"), "{}", failed.reason);
    let secrets = site_secrets(&fed.data_dir("site-b"))?;
    for s in &secrets {
        assert!(!failed.reason.contains(s.as_str()), "the reason names \"{s}\"");
    }
    let results = fed.results(&round).await?;
    let a = results.results.iter().find(|r| r.site == "site-a").expect("site-a's result");
    assert_eq!(organs_with_dice(a.result.as_ref().expect("result")), 9);
    for ag in &mut fed.agents {
        ag.stop().await?;
    }
    let (entries, _) = site_agent::agent::audit::AuditLog::read(&fed.storage("site-b"))?;
    assert_sends_none_of("site-b", &entries, &secrets);
    fed.shutdown().await
}

/// A result submitted twice (a retry after a lost answer) is recorded once: the second
/// submission of the finished task answers `recorded: false` and changes nothing, even when it
/// carries other scores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_submitted_twice_counts_once() -> R {
    let fed = Federation::builder().sites(1).without_agents().start().await?;
    fed.study("once", "tiny").await?;
    let round = fed.start_round("once", evaluate()).await?;
    let mut a = site_link(&fed, "site-a").await?;
    let task = a.next_task(2).await?.expect("a task");
    let result = |dice: f64| pb::SubmitResultRequest {
        task_id: task.task_id.clone(),
        attempt: task.attempt,
        outcome: Some(pb::submit_result_request::Outcome::Result(pb::TaskResult {
            arms: vec![pb::ArmResult {
                scores: vec![pb::CaseScore {
                    organ: "brainstem".into(),
                    case_index: 0,
                    dice,
                    hd95_mm: None,
                }],
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    };
    assert!(a.submit(result(0.8)).await?, "the first submission is recorded");
    assert!(!a.submit(result(0.1)).await?, "the second is not");
    let results = fed.results(&round).await?;
    assert_eq!(results.results.len(), 1, "one result");
    let dice = results.results[0].result.as_ref().expect("result").arms[0].scores[0].dice;
    assert_eq!(dice, 0.8, "the first submission's scores stand");
    let info = fed.wait_round(&round, 30).await?;
    assert_eq!(info.state, pb::RoundState::Completed as i32);
    fed.shutdown().await
}

/// The coordinator process is killed (SIGKILL) and started again in the middle of a
/// finetune round: the results submitted before stay, each counted once, and the round
/// completes. site-c's agent is held back until after the restart, so the round is still
/// running when the coordinator dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_round_loses_nothing() -> R {
    let mut fed =
        Federation::builder().sites(3).coordinator_process().without_agents().start().await?;
    fed.start_agent("site-a")?;
    fed.start_agent("site-b")?;
    fed.study("restart", "tiny").await?;
    let round = fed.start_round("restart", finetune(3, 2)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let before = loop {
        let r = fed.results(&round).await?;
        if !r.results.is_empty() {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "no result within 240 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(before.round.as_ref().map(|r| r.state), Some(pb::RoundState::Running as i32));
    // The study lead's `round watch` follows the round across the restart.
    let conn = fed.conn(coordinator::identity::Role::Admin, "lead");
    let args = [
        "round".to_string(),
        "watch".into(),
        round.clone(),
        "--coordinator".into(),
        conn.coordinator.clone(),
        "--bundle".into(),
        conn.bundle.display().to_string(),
    ];
    let watch = tokio::task::spawn_blocking(move || {
        tests::coordinator(&args.iter().map(String::as_str).collect::<Vec<_>>())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    fed.restart_coordinator().await?;
    fed.start_agent("site-c")?;
    let info = fed.wait_round(&round, 300).await?;
    assert_eq!(info.state, pb::RoundState::Completed as i32, "{info:?}");
    let watch = tokio::time::timeout(Duration::from_secs(60), watch).await???;
    eprintln!("the watch across the restart:\n{}{}", watch.stdout, watch.stderr);
    assert_eq!(watch.code, Some(0), "{}\n{}", watch.stdout, watch.stderr);
    assert!(watch.stderr.contains("lost the coordinator"), "{}", watch.stderr);
    assert!(watch.stdout.contains("site-c: succeeded"), "{}", watch.stdout);
    let results = fed.results(&round).await?;
    assert_eq!(results.results.len(), 3, "each site's result once");
    for r in &before.results {
        let again = results
            .results
            .iter()
            .find(|x| x.site == r.site)
            .expect("a result from before the kill");
        assert_eq!(again.result, r.result, "unchanged by the restart");
    }
    fed.shutdown().await
}
