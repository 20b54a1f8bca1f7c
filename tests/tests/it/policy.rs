//! Site policy over the federation: a task beyond policy is refused with its reason and not
//! half-run, a stopping agent releases its lease, and weights leave a site only where its
//! policy shares them.

use std::time::Duration;

use proto::pb;
use tests::federation::{Federation, site_link};

type R = anyhow::Result<()>;

fn finetune(k: u32, epochs: u32) -> pb::TaskSpec {
    pb::TaskSpec {
        kind: pb::TaskKind::Finetune as i32,
        trainable_layers: k,
        epochs,
        ..Default::default()
    }
}

/// A task beyond a site's policy is refused with the reason, before any work; a site agent
/// stopped in the middle of training finishes its step and releases the task, which another
/// run of the agent then completes without using up an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_refusals_and_release_on_shutdown() -> R {
    let fed = Federation::builder().sites(2).without_agents().start().await?;
    // site-a only evaluates.
    let mut cfg = fed.site_config("site-a")?;
    cfg.policy.allowed_tasks = vec!["evaluate".into()];
    let (stop_a, rx) = tokio::sync::oneshot::channel::<()>();
    let agent_a = tokio::spawn(site_agent::agent::run(cfg, async move {
        let _ = rx.await;
    }));
    fed.study("policy", "tiny").await?;
    // site-b allows long training, and trains long enough to be stopped in the middle.
    let mut cfg_b = fed.site_config("site-b")?;
    cfg_b.policy.max_epochs = 100_000;
    cfg_b.policy.max_hours = 1000.0;
    let (stop_b, rx_b) = tokio::sync::oneshot::channel::<()>();
    let agent_b = tokio::spawn(site_agent::agent::run(cfg_b, async move {
        let _ = rx_b.await;
    }));
    let round = fed.start_round("policy", finetune(3, 9_000)).await?;
    // Wait until site-b is training, then stop its agent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let r = fed.round(&round).await?;
        let b = r.tasks.iter().find(|t| t.site == "site-b").expect("task");
        if b.progress.as_ref().is_some_and(|p| p.phase == "train") {
            break;
        }
        assert!(
            b.state == pb::TaskState::Pending as i32 || b.state == pb::TaskState::Leased as i32,
            "{r:?}"
        );
        assert!(tokio::time::Instant::now() < deadline, "site-b never reported training: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_b.send(());
    tokio::time::timeout(Duration::from_secs(60), agent_b).await???;
    // site-a refuses on its next poll, which on a loaded machine can come after site-b trains.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let r = loop {
        let r = fed.round(&round).await?;
        let a = r.tasks.iter().find(|t| t.site == "site-a").expect("task");
        if a.state != pb::TaskState::Pending as i32 || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let a_task = r.tasks.iter().find(|t| t.site == "site-a").expect("task");
    assert_eq!(a_task.state, pb::TaskState::Refused as i32, "{a_task:?}");
    assert_eq!(
        a_task.reason,
        "kind not allowed: the task is a finetune task; policy.allowed_tasks is [evaluate]"
    );
    let b_task = r.tasks.iter().find(|t| t.site == "site-b").expect("task");
    assert_eq!(b_task.state, pb::TaskState::Pending as i32, "released on shutdown: {b_task:?}");
    assert_eq!(b_task.attempt, 0, "a released lease does not count as an attempt");
    // The round waits for site-b, which is not coming back: cancel it, which the
    // coordinator reports to the heartbeats of any agent still working on it.
    let cancelled =
        fed.admin().await?.cancel_round(pb::RoundRequest { round_id: round }).await?.into_inner();
    assert_eq!(cancelled.state, pb::RoundState::Cancelled as i32);
    let _ = stop_a.send(());
    agent_a.await??;
    fed.shutdown().await
}

/// Standard gRPC health checking answers SERVING for both services.
/// Weights leave a site only where its own policy shares them: a source site with the default
/// policy (`share_weights = false`) refuses the transfer source task before any work, the
/// targets waiting for Model_S fail without running, and no site can upload weights for a task
/// that is not its leased source task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_leave_a_site_only_where_its_policy_shares_them() -> R {
    use coordinator::lead::templates::{self, Template, TemplateOptions};
    let fed = Federation::builder().sites(2).start().await?;
    let mut admin = fed.admin().await?;
    for s in &fed.sites {
        admin.approve_site(pb::SiteRequest { name: s.clone(), ..Default::default() }).await?;
    }
    admin
        .create_study(pb::CreateStudyRequest {
            name: "xfer".into(),
            base_model: String::new(),
            sites: fed.sites.clone(),
        })
        .await?;
    let o = TemplateOptions {
        epochs: 1,
        finetune_epochs: 1,
        config: "tiny".into(),
        ..Default::default()
    };
    let no_source = admin
        .start_round(pb::StartRoundRequest {
            study: "xfer".into(),
            spec: Some(templates::target_spec(Template::Transfer, &o).map_err(anyhow::Error::msg)?),
            ..Default::default()
        })
        .await
        .expect_err("no base model and no source site");
    assert!(no_source.message().contains("--source"), "{no_source:?}");
    let round = admin
        .start_round(pb::StartRoundRequest {
            study: "xfer".into(),
            spec: Some(templates::target_spec(Template::Transfer, &o).map_err(anyhow::Error::msg)?),
            source_site: fed.sites[0].clone(),
            source_spec: Some(templates::source_spec(&o, 1)),
            ..Default::default()
        })
        .await?
        .into_inner();
    let waiting = round.tasks.iter().find(|t| !t.source).expect("a target task");
    assert_eq!(waiting.state, pb::TaskState::Waiting as i32);
    let info = fed.wait_round(&round.round_id, 120).await?;
    assert_eq!(info.state, pb::RoundState::Failed as i32, "{info:?}");
    let source = info.tasks.iter().find(|t| t.source).expect("the source task");
    assert_eq!(source.state, pb::TaskState::Refused as i32);
    assert_eq!(
        source.reason,
        "sharing not allowed: the task uploads the trained Model_S; policy.share_weights is false"
    );
    let target = info.tasks.iter().find(|t| !t.source).expect("the target task");
    assert_eq!(target.state, pb::TaskState::Failed as i32);
    assert!(target.reason.contains("did not deliver Model_S"), "{}", target.reason);
    assert_eq!(target.attempt, 0, "the target never ran");
    let audit = std::fs::read_to_string(fed.storage(&fed.sites[0]).join("audit.jsonl"))?;
    assert!(!audit.contains("UploadModel"), "nothing was uploaded");

    // An upload for a task that is not the caller's leased source task is refused.
    let weights = fed.base_model("tiny")?;
    let mut link = site_link(&fed, &fed.sites[1]).await?;
    let task = format!("{}.{}", round.round_id, fed.sites[0]);
    match link.upload_model(&task, 1, 0, &weights).await {
        Err(site_agent::agent::CallError::Status(s)) => {
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(admin.list_models(pb::ListModelsRequest {}).await?.into_inner().models.is_empty());
    fed.shutdown().await
}
