//! The `site-agent` command line on phantom data, end to end.

use anyhow::Result;
use serde_json::Value;
use tests::site_agent;

fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

#[test]
fn train_finetune_evaluate_predict_and_score() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (src, tgt) = (d.join("source"), d.join("target"));
    site_agent(&[
        "phantom",
        "--center",
        "source",
        "--cases",
        "3",
        "--test",
        "1",
        "--seed",
        "2",
        "--out",
        s(&src),
    ])?
    .ok()?;
    site_agent(&[
        "phantom",
        "--center",
        "target-b",
        "--cases",
        "3",
        "--test",
        "1",
        "--seed",
        "2",
        "--out",
        s(&tgt),
    ])?
    .ok()?;
    let (sm, tm) = (src.join("manifest.toml"), tgt.join("manifest.toml"));
    let check = site_agent(&["check-data", "--manifest", s(&tm)])?.ok()?;
    assert!(check.stdout.contains("ok: 3 cases (2 train, 1 test), 9 organs"), "{}", check.stdout);

    let base = d.join("s.safetensors");
    let fast = ["--epochs", "1", "--batch-size", "8"];
    let mut args = vec!["train", "--manifest", s(&sm), "--config", "tiny", "--out", s(&base)];
    args.extend(fast);
    site_agent(&args)?.ok()?;
    let tuned = d.join("st.safetensors");
    let mut args = vec![
        "finetune",
        "--manifest",
        s(&tm),
        "--base",
        s(&base),
        "--trainable-layers",
        "2",
        "--out",
        s(&tuned),
    ];
    args.extend(fast);
    let ft = site_agent(&args)?.ok()?;
    assert!(ft.stdout.contains("trained 2 of 14 layers"), "{}", ft.stdout);
    let record: Value = serde_json::from_str(&std::fs::read_to_string(d.join("st.train.json"))?)?;
    assert_eq!(record["options"]["epochs"], 1);

    let eval =
        site_agent(&["evaluate", "--manifest", s(&tm), "--weights", s(&tuned), "--json"])?.ok()?;
    let v: Value = serde_json::from_str(&eval.stdout)?;
    let scores = v["cases"][0]["scores"].as_array().expect("scores");
    assert_eq!(scores.len(), 9);
    assert!(!eval.stdout.contains("target-b-"), "case identifiers never appear in results");

    let image = tgt.join("images/target-b-003.nii.gz");
    let pred = d.join("pred.nii.gz");
    site_agent(&["predict", "--weights", s(&tuned), "--image", s(&image), "--out", s(&pred)])?
        .ok()?;
    let truth = tgt.join("labels/target-b-003.nii.gz");
    let m = site_agent(&[
        "metrics",
        "--truth",
        s(&truth),
        "--pred",
        s(&pred),
        "--labels",
        "1,2,3",
        "--json",
    ])?
    .ok()?;
    let v: Value = serde_json::from_str(&m.stdout)?;
    let labels = v["labels"].as_array().expect("labels");
    assert_eq!(labels.len(), 3);
    for l in labels {
        let dice = l["dice"].as_f64().expect("dice");
        assert!((0.0..=1.0).contains(&dice));
        assert!(l["hd95_mm"].is_null() || l["hd95_mm"].as_f64().is_some());
    }
    // A model for another organ map is refused before any work.
    let fake = d.join("other");
    std::fs::create_dir_all(&fake)?;
    let text = std::fs::read_to_string(&tm)?.replace("\"eye_r\"", "\"eye_right\"");
    std::fs::write(
        fake.join("manifest.toml"),
        text.replace("images/", "../target/images/").replace("labels/", "../target/labels/"),
    )?;
    let refused = site_agent(&[
        "evaluate",
        "--manifest",
        s(&fake.join("manifest.toml")),
        "--weights",
        s(&tuned),
    ])?;
    assert_ne!(refused.code, Some(0));
    assert!(refused.stderr.contains("organ map"), "{}", refused.stderr);
    Ok(())
}

#[test]
fn metrics_json_follows_the_interface() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let dims = [6, 5, 4];
    let mut truth = site_agent::data::Volume::filled(dims, [1.0, 1.0, 2.0], 0u16);
    let mut pred = truth.clone();
    for z in 1..3 {
        for y in 1..4 {
            for x in 1..4 {
                let i = truth.index(x, y, z);
                truth.data[i] = 1;
                pred.data[i + 1] = 1;
            }
        }
    }
    pred.data[0] = 5; // only in the prediction: Dice 0, HD95 undefined
    site_agent::data::write_labels(&d.join("t.nii"), &truth)?;
    site_agent::data::write_labels(&d.join("p.nii.gz"), &pred)?;
    let out = site_agent(&[
        "metrics",
        "--truth",
        s(&d.join("t.nii")),
        "--pred",
        s(&d.join("p.nii.gz")),
        "--json",
    ])?
    .ok()?;
    let v: Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(v["labels"][0]["label"], 1);
    assert!((v["labels"][0]["dice"].as_f64().expect("dice") - 2.0 * 12.0 / 36.0).abs() < 1e-12);
    assert_eq!(v["labels"][1]["label"], 5);
    assert_eq!(v["labels"][1]["dice"], 0.0);
    assert!(v["labels"][1]["hd95_mm"].is_null());
    // Shapes must agree.
    let other = site_agent::data::Volume::filled([6, 5, 3], [1.0; 3], 0u16);
    site_agent::data::write_labels(&d.join("o.nii"), &other)?;
    let bad =
        site_agent(&["metrics", "--truth", s(&d.join("t.nii")), "--pred", s(&d.join("o.nii"))])?;
    assert_ne!(bad.code, Some(0));
    assert!(bad.stderr.contains("same grid"), "{}", bad.stderr);
    Ok(())
}

#[test]
fn bad_site_data_fails_naming_case_and_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let m = site_agent::data::phantom::write_center(
        site_agent::data::phantom::Center::Source,
        2,
        1,
        1,
        d,
    )?;
    // Truncate one label file.
    let label = &m.cases[1].label;
    let bytes = std::fs::read(label)?;
    std::fs::write(label, &bytes[..bytes.len() / 3])?;
    let out = site_agent(&["check-data", "--manifest", s(&m.path)])?;
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("source-002") && out.stderr.contains("source-002.nii.gz"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("1 of 2 cases failed"), "{}", out.stderr);
    Ok(())
}

#[test]
fn usage_errors_exit_64() -> Result<()> {
    let out = site_agent(&["train", "--config", "tiny"])?;
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    // A device that is not a device is a usage error naming the forms.
    let out = site_agent(&["bench", "--device", "tpu"])?;
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(out.stderr.contains("auto, cpu, cuda, cuda:N"), "{}", out.stderr);
    Ok(())
}

/// Asking for a GPU the build or the machine cannot give fails before any work and says what
/// to do; `auto` falls back to the CPU and says so.
#[test]
fn an_unavailable_gpu_is_refused_with_what_to_do() -> Result<()> {
    let out = site_agent(&["bench", "--device", "cuda:0", "--steps", "1", "--repeat", "1"])?;
    if site_agent::device::cuda_built() {
        // A CUDA build: refused only where the driver shows no GPU.
        if out.code != Some(0) {
            assert!(out.stderr.contains("no CUDA GPU is visible"), "{}", out.stderr);
        }
    } else {
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        assert!(out.stderr.contains("needs a build with CUDA"), "{}", out.stderr);
        assert!(out.stderr.contains("--features cuda"), "{}", out.stderr);
        assert!(!out.stdout.contains("images/s"), "nothing ran: {}", out.stdout);
    }
    let auto = site_agent(&[
        "bench", "--device", "auto", "--steps", "1", "--repeat", "1", "--batch", "2", "--json",
    ])?
    .ok()?;
    let r: serde_json::Value = serde_json::from_str(auto.stdout.trim())?;
    let device = r["device"].as_str().unwrap_or_default();
    if !site_agent::device::cuda_built() {
        assert!(device.starts_with("cpu"), "{device}");
        assert!(device.ends_with("; auto: this build has no CUDA"), "{device}");
        assert!(r["peak_device_mib"].is_null(), "{r}");
    }
    Ok(())
}

/// The PKI commands make bundles, refuse what they must with a clear message, and a bad
/// command line exits 64.
#[test]
fn coordinator_pki_commands() -> Result<()> {
    use tests::coordinator;
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    coordinator(&["pki", "init", "--dir", s(&pki)])?.ok()?;
    for f in ["ca.pem", "ca.key", "server/cert.pem", "server/key.pem", "crl.pem"] {
        assert!(pki.join(f).exists(), "{f}");
    }
    let again = coordinator(&["pki", "init", "--dir", s(&pki)])?;
    assert_eq!(again.code, Some(1));
    assert!(again.stderr.contains("exists already"), "{}", again.stderr);
    coordinator(&["pki", "issue-site", "hospital-a", "--dir", s(&pki)])?.ok()?;
    for f in ["cert.pem", "key.pem", "ca.pem"] {
        assert!(pki.join("sites/hospital-a").join(f).exists(), "{f}");
    }
    let twice = coordinator(&["pki", "issue-site", "hospital-a", "--dir", s(&pki)])?;
    assert!(twice.stderr.contains("revoke it first"), "{}", twice.stderr);
    assert!(twice.stderr.contains("--force"), "{}", twice.stderr);
    let first_cert = std::fs::read_to_string(pki.join("sites/hospital-a/cert.pem"))?;
    let forced =
        coordinator(&["pki", "issue-site", "hospital-a", "--dir", s(&pki), "--force"])?.ok()?;
    assert!(forced.stdout.contains("revoked the previous site certificate"), "{}", forced.stdout);
    assert_ne!(std::fs::read_to_string(pki.join("sites/hospital-a/cert.pem"))?, first_cert);
    let crl = |p: &std::path::Path| -> Result<std::collections::HashSet<String>> {
        coordinator::identity::crl_serials(&std::fs::read(p.join("crl.pem"))?)
            .map_err(anyhow::Error::msg)
    };
    assert_eq!(crl(&pki)?.len(), 1, "the replaced certificate is on the CA's CRL");
    let bad = coordinator(&["pki", "issue-site", "Hospital A", "--dir", s(&pki)])?;
    assert!(bad.stderr.contains("not a valid name"), "{}", bad.stderr);
    let revoked = coordinator(&["pki", "revoke", "hospital-a", "--dir", s(&pki)])?.ok()?;
    assert!(revoked.stdout.contains("revoked site hospital-a"), "{}", revoked.stdout);
    assert_eq!(crl(&pki)?.len(), 2, "the revoked certificate is on the CA's CRL");
    // A new bundle under the same name after revocation.
    coordinator(&["pki", "issue-site", "hospital-a", "--dir", s(&pki)])?.ok()?;
    let no_ca =
        coordinator(&["pki", "issue-admin", "lead", "--dir", s(&dir.path().join("nothing"))])?;
    assert!(no_ca.stderr.contains("pki init"), "{}", no_ca.stderr);
    assert_eq!(coordinator(&["round", "start"])?.code, Some(64));
    // Federated and replicate flags are refused where they mean nothing, before any call.
    for (args, says) in [
        (&["--task", "evaluate", "--rounds", "3"][..], "are for --task fedavg"),
        (
            &["--task", "finetune", "--trainable-layers", "2", "--replicates", "2"][..],
            "--replicates is for",
        ),
        (&["--task", "fedavg"][..], "fedavg needs --rounds"),
        (
            &["--task", "fedavg", "--rounds", "2", "--trainable-layers", "1,2"][..],
            "one --trainable-layers",
        ),
    ] {
        let mut all = vec!["round", "start", "npc", "--coordinator", "https://127.0.0.1:9"];
        all.extend(["--bundle", "no-such-bundle"]);
        all.extend_from_slice(args);
        let out = coordinator(&all)?;
        assert_ne!(out.code, Some(0));
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
    Ok(())
}

/// A script can tell a failed or cancelled round from a good one by the exit code of
/// `round start --watch`, `round watch` and `round status`: 0 completed, 2 failed, 3 cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_commands_exit_nonzero_for_a_failed_or_cancelled_round() -> Result<()> {
    use coordinator::identity::Role;
    use proto::pb;
    let fed = tests::federation::Federation::builder().sites(1).start().await?;
    fed.study("codes", "tiny").await?;
    let conn = fed.conn(Role::Admin, "lead");
    let (addr, bundle) = (conn.coordinator.clone(), conn.bundle.display().to_string());
    let cli = move |args: Vec<String>| {
        let mut all = args;
        all.extend(["--coordinator".into(), addr.clone(), "--bundle".into(), bundle.clone()]);
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            tests::coordinator(&refs)
        })
    };
    let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    // The site refuses 5000 epochs (policy.max_epochs 200): the round fails.
    let failed =
        cli(words("round start codes --task train --config tiny --epochs 5000 --watch")).await??;
    assert_eq!(failed.code, Some(2), "{}\n{}", failed.stdout, failed.stderr);
    assert!(failed.stderr.contains("failed"), "{}", failed.stderr);
    // The refusal says which limit.
    assert!(
        failed
            .stdout
            .contains("too many epochs: the task asks 5000 epochs; policy.max_epochs is 200"),
        "{}",
        failed.stdout
    );
    let round = failed
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("round ")?.strip_suffix(" started"))
        .expect("the round id")
        .to_owned();
    let status = cli(vec!["round".into(), "status".into(), round.clone()]).await??;
    assert_eq!(status.code, Some(2), "{}", status.stderr);
    let watch = cli(vec!["round".into(), "watch".into(), round]).await??;
    assert_eq!(watch.code, Some(2), "{}", watch.stderr);
    // A completed round: 0.
    let good = cli(words("round start codes --task evaluate --watch")).await??;
    assert_eq!(good.code, Some(0), "{}\n{}", good.stdout, good.stderr);
    // Not on a terminal: a line per change of the site's task, ending with its success.
    let changes: Vec<&str> =
        good.stdout.lines().filter(|l| l.starts_with('[') && l.contains("] site-a: ")).collect();
    assert!(changes.last().is_some_and(|l| l.ends_with("site-a: succeeded")), "{}", good.stdout);
    // A cancelled round: 3 (cancelling itself succeeds).
    let spec = pb::TaskSpec {
        kind: pb::TaskKind::Train as i32,
        epochs: 150,
        config: "tiny".into(),
        ..Default::default()
    };
    let round = fed.start_round("codes", spec).await?;
    let cancel = cli(vec!["round".into(), "cancel".into(), round.clone()]).await??;
    assert_eq!(cancel.code, Some(0), "{}", cancel.stderr);
    let status = cli(vec!["round".into(), "status".into(), round.clone()]).await??;
    assert_eq!(status.code, Some(3), "{}", status.stderr);
    assert!(status.stderr.contains("cancelled"), "{}", status.stderr);
    // A lost round id: `round list`, newest first, each with its task and state.
    let list = cli(words("round list --study codes")).await??;
    assert_eq!(list.code, Some(0), "{}", list.stderr);
    let lines: Vec<&str> = list.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", list.stdout);
    assert!(lines[0].starts_with(&round) && lines[0].contains("cancelled"), "{}", list.stdout);
    assert!(lines[1].contains(" evaluate ") && lines[1].contains("1/1 sites"), "{}", list.stdout);
    assert!(lines[2].contains(" train ") && lines[2].contains(" failed "), "{}", list.stdout);
    let unknown = cli(words("round list --study nope")).await??;
    assert_eq!(unknown.code, Some(1), "{}", unknown.stderr);
    assert!(unknown.stderr.contains("no study \"nope\""), "{}", unknown.stderr);
    fed.shutdown().await
}
