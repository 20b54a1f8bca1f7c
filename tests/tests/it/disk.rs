//! The coordinator's data dir on a real, small file system that fills up and then turns
//! read-only: writes are refused with a status that says so, nothing already stored changes,
//! and the coordinator takes writes again once there is room (after a restart at most).
//!
//! Mounting a tmpfs needs root (CAP_SYS_ADMIN); where the test cannot mount one it says so
//! and does nothing else.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use proto::pb;
use tests::federation::Federation;

type R = anyhow::Result<()>;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts `size_mib` MiB at `dir`; the reason when this machine does not allow it.
    fn mount(dir: &Path, size_mib: u32) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "fedtune-test"])
            .arg(dir)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Self(dir.to_owned()))
    }

    fn remount(&self, mode: &str) -> anyhow::Result<()> {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.0)
            .status()?
            .success();
        anyhow::ensure!(ok, "remount {mode} {}", self.0.display());
        Ok(())
    }
}

/// A read-only bind mount of a folder over itself, removed when dropped.
struct Bind(PathBuf);

impl Bind {
    fn read_only(dir: &Path) -> anyhow::Result<Self> {
        let ok = Command::new("mount").arg("--bind").arg(dir).arg(dir).status()?.success()
            && Command::new("mount").args(["-o", "remount,bind,ro"]).arg(dir).status()?.success();
        anyhow::ensure!(ok, "read-only bind mount of {}", dir.display());
        Ok(Self(dir.to_owned()))
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> anyhow::Result<u64> {
    let mut f = std::fs::File::create(path)?;
    let mut written = 0u64;
    for block in [256 << 10, 4 << 10, 512, 64, 1] {
        let buf = vec![0xa5u8; block];
        loop {
            match f.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => return Err(e.into()),
            }
        }
    }
    let _ = f.sync_all();
    Ok(written)
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    Ok(site_agent::weights::sha256_hex(&std::fs::read(path)?))
}

async fn model_names(fed: &Federation) -> anyhow::Result<Vec<String>> {
    let models = fed.admin().await?.list_models(pb::ListModelsRequest {}).await?.into_inner();
    let mut names: Vec<String> =
        models.models.into_iter().filter_map(|m| m.model.map(|r| r.name)).collect();
    names.sort();
    Ok(names)
}

async fn push(fed: &Federation, file: &Path, name: &str) -> Result<pb::ModelInfo, tonic::Status> {
    let mut admin = fed.admin().await.map_err(|e| tonic::Status::unknown(e.to_string()))?;
    coordinator::lead::push_model(&mut admin, file, name, false).await.map_err(|e| {
        match e.downcast_ref::<coordinator::lead::CallFailed>() {
            Some(failed) => failed.0.clone(),
            None => tonic::Status::unknown(e.to_string()),
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_read_only_disk_refuses_writes_clearly_and_keeps_what_was_stored() -> R {
    let scratch = tempfile::tempdir()?;
    let mnt = match Tmpfs::mount(&scratch.path().join("mnt"), 24) {
        Ok(m) => m,
        Err(why) => {
            tests::skipped(
                env!("CARGO_TARGET_TMPDIR"),
                &format!(
                    "disk.rs: the full and read-only disk test mounts a 24 MiB tmpfs, which this \
                 machine refused ({why}); run it as root"
                ),
            );
            return Ok(());
        }
    };
    let data = mnt.0.join("coordinator-data");
    let mut fed = Federation::builder()
        .sites(1)
        .without_agents()
        .coordinator_process()
        .coordinator_data(&data)
        .start()
        .await?;
    let kept = fed.study("kept", "tiny").await?;
    let kept_sha = {
        let models = fed.admin().await?.list_models(pb::ListModelsRequest {}).await?.into_inner();
        models.models[0].model.clone().expect("model").sha256
    };
    let small = fed.model_file("small", 1)?;
    let small2 = fed.model_file("small", 2)?;

    // Full.
    let filled = fill(&mnt.0.join("filler"))?;
    let r = push(&fed, &small, "while-full").await;
    let full = r.expect_err("an upload to a full disk was accepted");
    assert_eq!(full.code(), tonic::Code::ResourceExhausted, "{}", full.message());
    assert!(full.message().contains("disk is full"), "{}", full.message());
    // Studies are small records in the database: create them until the database too runs
    // out of room (or 300 were acknowledged). Each is acknowledged only once flushed.
    let mut admin = fed.admin().await?;
    let mut acknowledged = Vec::new();
    let mut db_refusal = None;
    for i in 0..300 {
        let name = format!("while-full-{i}");
        let r = admin
            .create_study(pb::CreateStudyRequest {
                name: name.clone(),
                base_model: "base-tiny".into(),
                sites: fed.sites.clone(),
            })
            .await;
        match r {
            Ok(_) => acknowledged.push(name),
            Err(s) => {
                assert!(
                    matches!(s.code(), tonic::Code::ResourceExhausted | tonic::Code::Unavailable),
                    "{:?}: {}",
                    s.code(),
                    s.message()
                );
                db_refusal = Some(s);
                break;
            }
        }
    }
    let study_outcome = match &db_refusal {
        None => format!("{} studies created, all acknowledged", acknowledged.len()),
        Some(s) => format!(
            "{} acknowledged, then refused ({:?}: {})",
            acknowledged.len(),
            s.code(),
            s.message()
        ),
    };
    // What was stored is still served, byte for byte.
    assert_eq!(model_names(&fed).await?, ["base-tiny"]);
    assert_eq!(sha256_of(&data.join("blobs").join(&kept_sha))?, kept_sha);
    let tmp_left = std::fs::read_dir(data.join("blobs/tmp"))?.count();
    assert_eq!(tmp_left, 0, "a failed upload left its temporary file");

    // Room again: the coordinator takes writes (a restart clears a database that gave up).
    std::fs::remove_file(mnt.0.join("filler"))?;
    let after_room = push(&fed, &small, "after-room").await;
    if let Err(s) = &after_room {
        assert!(s.message().contains("restart"), "{}", s.message());
        // Health says so: NOT_SERVING once the ticker saw the stopped database.
        let mut health = tonic_health::pb::health_client::HealthClient::new(
            fed.channel(Some(&fed.bundle(coordinator::identity::Role::Admin, "lead"))),
        );
        let stopped = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let r = health
                .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                .await?;
            if r.into_inner().status == stopped {
                break;
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "health still SERVING");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        fed.restart_coordinator().await?;
        push(&fed, &small, "after-room").await?;
    }

    // The blob store turns read-only under the running coordinator (a read-only bind mount
    // over it; the kernel refuses to remount a file system read-only while files are open
    // for writing, as the database's are).
    let blobs = data.join("blobs");
    let _ro = Bind::read_only(&blobs)?;
    let ro = push(&fed, &small, "while-ro").await.expect_err("an upload to a read-only disk");
    assert_eq!(ro.code(), tonic::Code::Unavailable, "{}", ro.message());
    assert!(ro.message().contains("cannot write its data"), "{}", ro.message());
    assert_eq!(model_names(&fed).await?, ["after-room", "base-tiny"]);
    drop(_ro);
    push(&fed, &small2, "after-ro").await?;

    // The whole data dir read-only at start: the coordinator refuses to start, naming it.
    fed.stop_coordinator().await?;
    mnt.remount("ro")?;
    let e = fed.restart_coordinator().await.expect_err("started on a read-only data dir");
    let log = std::fs::read_to_string(fed.root.join("coordinator.log"))?;
    assert!(log.contains(&data.display().to_string()), "{e:#}\n{log}");
    let refused_start =
        log.lines().rev().find(|l| l.contains("coordinator-data")).unwrap_or_default().to_owned();
    assert!(refused_start.contains("its file system is read-only: remount it"), "{refused_start}");
    mnt.remount("rw")?;

    // After a kill and a restart, everything that was acknowledged is there.
    fed.restart_coordinator().await?;
    assert_eq!(model_names(&fed).await?, ["after-ro", "after-room", "base-tiny"]);
    let studies = fed.admin().await?.list_studies(pb::ListStudiesRequest {}).await?.into_inner();
    assert!(studies.studies.iter().any(|s| s.name == kept.name));
    for name in &acknowledged {
        assert!(
            studies.studies.iter().any(|s| &s.name == name),
            "study {name} was acknowledged while the disk was full, and lost"
        );
    }
    eprintln!(
        "disk full after {filled} more bytes: upload refused (\"{}\"); study creation: \
         {study_outcome}; after freeing space: {}; blob store read-only: refused (\"{}\"); data dir read-only at start: {refused_start}",
        full.message(),
        match &after_room {
            Ok(_) => "writes resumed at once".to_owned(),
            Err(s) => format!("writes refused ({}), resumed after a restart", s.message()),
        },
        ro.message()
    );
    fed.shutdown().await?;
    drop(mnt);
    Ok(())
}
