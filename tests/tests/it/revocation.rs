//! A site revoked while it trains: its agent stops within a heartbeat and its task fails at
//! once, so the round settles by quorum instead of waiting a day for its deadline. A round on
//! a study with a revoked site is refused unless the quorum can be met without it, and then
//! it says so; `site approve` does not silently reinstate a revoked site; `site list` shows a
//! site whose certificate `pki revoke` listed as revoked.

use std::time::{Duration, Instant};

use coordinator::identity::Role;
use proto::pb;
use tests::federation::Federation;

type R = anyhow::Result<()>;

fn train(epochs: u32) -> pb::TaskSpec {
    pb::TaskSpec {
        kind: pb::TaskKind::Train as i32,
        epochs,
        config: "tiny".into(),
        ..Default::default()
    }
}

fn task<'a>(info: &'a pb::RoundInfo, site: &str) -> &'a pb::TaskInfo {
    info.tasks.iter().find(|t| t.site == site).expect("the site's task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_site_stops_and_its_round_does_not_wait() -> R {
    let fed = Federation::builder().sites(2).start().await?;
    fed.study("rev", "tiny").await?;
    let mut admin = fed.admin().await?;
    let round = admin
        .start_round(pb::StartRoundRequest {
            study: "rev".into(),
            spec: Some(train(150)),
            quorum: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .round_id;
    // site-b trains ...
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let info = fed.round(&round).await?;
        let b = task(&info, "site-b");
        if b.state == pb::TaskState::Leased as i32
            && b.progress.as_ref().is_some_and(|p| p.epoch >= 1)
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "site-b did not start training: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and is revoked.
    let revoked_at = Instant::now();
    admin.revoke_site(pb::SiteRequest { name: "site-b".into(), ..Default::default() }).await?;
    let agent_b = fed.agents.iter().find(|a| a.name == "site-b").expect("site-b's agent");
    let (mut task_failed, mut agent_stopped) = (None, None);
    while task_failed.is_none() || agent_stopped.is_none() {
        let info = fed.round(&round).await?;
        let b = task(&info, "site-b");
        if task_failed.is_none() && b.state == pb::TaskState::Failed as i32 {
            assert!(b.reason.contains("revoked"), "{}", b.reason);
            task_failed = Some(revoked_at.elapsed());
        }
        if agent_stopped.is_none() && !agent_b.is_running() {
            agent_stopped = Some(revoked_at.elapsed());
        }
        anyhow::ensure!(
            revoked_at.elapsed() < Duration::from_secs(30),
            "30 s after the revocation: task failed {task_failed:?}, agent stopped {agent_stopped:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "site-b revoked mid-training: its task failed after {:?}, its agent stopped after {:?} \
         (heartbeat 1 s)",
        task_failed.expect("set"),
        agent_stopped.expect("set")
    );
    // The agent stopped on the refusal of its next heartbeat, not at the end of training.
    let info = fed.round(&round).await?;
    assert_eq!(info.state, pb::RoundState::Running as i32, "site-a still trains");
    assert!(agent_stopped.expect("set") < Duration::from_secs(10));
    admin.cancel_round(pb::RoundRequest { round_id: round }).await?;

    // A new round needs both sites by default: refused, saying which is revoked and what to do.
    let refused = admin
        .start_round(pb::StartRoundRequest {
            study: "rev".into(),
            spec: Some(train(2)),
            ..Default::default()
        })
        .await
        .expect_err("the quorum cannot be met");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("site-b") && refused.message().contains("--quorum 1"),
        "{}",
        refused.message()
    );
    // With a quorum the others can meet, it starts and warns.
    let started = admin
        .start_round(pb::StartRoundRequest {
            study: "rev".into(),
            spec: Some(train(2)),
            quorum: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        started.warnings,
        vec!["site site-b is revoked: its task fails at once".to_string()]
    );
    let done = fed.wait_round(&started.round_id, 120).await?;
    assert_eq!(done.state, pb::RoundState::Completed as i32, "{done:?}");
    assert!(task(&done, "site-b").reason.contains("revoked"));

    // Approving a revoked site needs --reinstate.
    let again = admin
        .approve_site(pb::SiteRequest { name: "site-b".into(), reinstate: false })
        .await
        .expect_err("not without --reinstate");
    assert!(again.message().contains("--reinstate"), "{}", again.message());
    let back =
        admin.approve_site(pb::SiteRequest { name: "site-b".into(), reinstate: true }).await?;
    assert!(back.into_inner().approved);

    // `pki revoke` of site-a's certificate: site list says so (the agent said hello with it).
    coordinator::pki::Pki::open(&fed.pki_dir)?.revoke(Role::Site, "site-a")?;
    let sites = admin.list_sites(pb::ListSitesRequest {}).await?.into_inner().sites;
    let a = sites.iter().find(|s| s.name == "site-a").expect("site-a");
    assert!(a.revoked && a.certificate_revoked && !a.approved, "{a:?}");
    let b = sites.iter().find(|s| s.name == "site-b").expect("site-b");
    assert!(!b.revoked && b.approved, "{b:?}");
    assert!(a.last_seen_unix > 0);
    fed.shutdown().await
}
