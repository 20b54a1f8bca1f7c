//! `site-agent simulate`, the load generator of `scale agents`: light agents with their own
//! certificates take real tasks over mutual TLS.

use std::process::Command;

use proto::pb;
use tests::federation::Federation;

use crate::federation::evaluate;

type R = anyhow::Result<()>;

/// Two simulated agents download the round's model, heartbeat through their fake work and
/// submit; the round completes, and the report lists both leases with the bytes fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_agents_take_a_round_and_report_it() -> R {
    let fed = Federation::builder().sites(2).without_agents().start().await?;
    let study = fed.study("sim", "tiny").await?;
    let size = study.base.as_ref().map(|b| b.size).unwrap_or_default();
    let report = fed.root.join("sim.json");
    let mut child = Command::new(tests::bin("site-agent")?)
        .args(["simulate", "--coordinator", &format!("https://{}", fed.addr)])
        .args(["--server-name", "localhost", "--bundles"])
        .arg(fed.pki_dir.join("sites"))
        .args(["--count", "2", "--workload-ms", "1500", "--heartbeat-ms", "400", "--fetch"])
        .args(["--seconds", "12", "--report"])
        .arg(&report)
        .spawn()?;
    let round = fed.start_round("sim", evaluate()).await?;
    let info = fed.wait_round(&round, 60).await?;
    let status = child.wait()?;
    assert!(status.success(), "site-agent simulate: {status}");
    assert_eq!(info.state, pb::RoundState::Completed as i32, "{info:?}");
    for t in &info.tasks {
        assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
        assert_eq!(t.bytes_down, size, "each agent downloaded the model once");
    }
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    let leases = r["leases"].as_array().expect("leases");
    assert_eq!(leases.len(), 2, "{r}");
    for l in leases {
        assert_eq!(l["round_id"], round.as_str());
        assert_eq!(l["fetched_bytes"].as_u64(), Some(size));
    }
    assert_eq!(r["results"].as_u64(), Some(2), "{r}");
    assert!(r["heartbeats"].as_u64().unwrap_or(0) >= 2, "they heartbeat while working: {r}");
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    fed.shutdown().await
}
