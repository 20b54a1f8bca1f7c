//! Faults with real processes: a site agent killed (SIGKILL) in the middle of a download, of
//! training and of a submission. The task is leased again once the lease expires, completes
//! on the restarted agent, and its result is counted once.

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
    let mut survived = Vec::new();
    for point in ["download", "train", "submit"] {
        let round = fed
            .admin()
            .await?
            .start_round(pb::StartRoundRequest {
                study: "kill".into(),
                spec: Some(pb::TaskSpec {
                    kind: pb::TaskKind::Finetune as i32,
                    trainable_layers: 2,
                    epochs: 1,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?
            .into_inner()
            .round_id;
        // Start, wait until the agent stands at the point, kill it there.
        let mut child = agent(&fed, "site-a", Some(point))?;
        let marker = fed.root.join(point);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !marker.exists() {
            assert!(tokio::time::Instant::now() < deadline, "the agent never reached {point}");
            if let Some(status) = child.try_wait()? {
                panic!("the agent exited ({status}) before {point}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        child.kill()?; // SIGKILL
        child.wait()?;
        std::fs::remove_file(&marker)?;
        // A clean agent takes over once the lease has expired.
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
        let results = fed
            .admin()
            .await?
            .get_results(pb::RoundRequest { round_id: round })
            .await?
            .into_inner();
        assert_eq!(results.results.len(), 1, "{point}: one result, counted once");
        let res = results.results[0].result.as_ref().expect("result");
        assert_eq!(res.epoch_losses.len(), 1);
        survived.push(point);
    }
    eprintln!("agent killed at {survived:?}: every task completed, each result counted once");
    fed.shutdown().await
}
