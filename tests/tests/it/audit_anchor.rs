//! The site's audit log checked against the head the coordinator kept: every site call
//! carries the log's newest entry, so a log cut at its end, or rewritten whole into a chain
//! that is consistent on its own, no longer matches (`site-agent audit --verify`).

use proto::pb;
use site_agent::agent::audit::AuditLog;
use tests::federation::Federation;
use tests::site_agent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_or_rewritten_audit_log_is_found_against_the_coordinators_head() -> anyhow::Result<()>
{
    let fed = Federation::builder().sites(1).without_agents().start().await?;
    let site = fed.sites[0].clone();
    let cfg = fed.site_config(&site)?;
    let toml = fed.root.join(format!("{site}.toml"));
    let toml = toml.to_str().unwrap();
    std::fs::create_dir_all(&cfg.storage.dir)?;
    {
        let audit = AuditLog::open(&cfg.storage.dir)?;
        let mut link = site_agent::agent::Link::connect(&cfg, audit).await?;
        for _ in 0..4 {
            link.hello(pb::HelloRequest::default()).await?;
        }
    } // The link and its log closed: the CLI reads the database.

    let ok = site_agent(&["audit", "--config", toml, "--verify"])?.ok()?;
    assert!(ok.stdout.contains("entry 3 matches the head the coordinator kept"), "{}", ok.stdout);

    // The last two entries removed: the chain that is left verifies on its own.
    let cut = |n: usize| -> anyhow::Result<()> {
        // Without sled's background flusher; and sled's own threads may still hold the file
        // lock for a moment after the last handle (here or in a process that just exited)
        // was dropped, so the open waits for it.
        let db = retry_locked(|| {
            sled::Config::new().path(cfg.storage.dir.join("audit")).flush_every_ms(None).open()
        })?;
        let tree = db.open_tree("outbound")?;
        for _ in 0..n {
            tree.pop_max()?;
        }
        db.flush()?;
        Ok(())
    };
    cut(2)?;
    site_agent(&["audit", "--config", toml, "--verify", "--offline"])?.ok()?;
    let cut_run = site_agent(&["audit", "--config", toml, "--verify"])?;
    assert_eq!(cut_run.code, Some(1), "{cut_run:?}");
    assert!(
        cut_run.stdout.contains("holds entry 3 of this log, but the log ends at entry 1"),
        "{}",
        cut_run.stdout
    );

    // Rewritten whole by someone who can write the files: a fresh, consistent chain of more
    // entries than before.
    cut(2)?;
    std::fs::remove_file(cfg.storage.dir.join("audit.jsonl"))?;
    {
        let log = retry_locked(|| AuditLog::open(&cfg.storage.dir))?;
        for i in 0..6u8 {
            log.record("fedtune.v1.SiteService/Hello", &[i])?;
        }
    }
    site_agent(&["audit", "--config", toml, "--verify", "--offline"])?.ok()?;
    let rewritten = site_agent(&["audit", "--config", toml, "--verify"])?;
    assert_eq!(rewritten.code, Some(1), "{rewritten:?}");
    assert!(rewritten.stdout.contains("entry 3 is not the entry the coordinator was told of"));
    fed.shutdown().await
}

/// `open()`, again while it fails only because another handle still holds the database's
/// file lock (for up to 10 s).
fn retry_locked<T, E: std::fmt::Display>(open: impl Fn() -> Result<T, E>) -> Result<T, E> {
    let mut tries = 0;
    loop {
        match open() {
            Err(e) if tries < 100 && e.to_string().contains("could not acquire lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
}
