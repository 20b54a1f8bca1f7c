//! `coordinator demo` as CI runs it: the tiny preset with the sweeps, real processes on
//! loopback with mutual TLS, and the report files it writes.

use anyhow::Result;

/// `coordinator demo --preset tiny ARGS --out OUT` with this build's site agent; it must
/// succeed.
fn demo(args: &[&str], out: &std::path::Path) -> Result<tests::Run> {
    let agent = tests::bin("site-agent")?;
    let mut all = vec!["demo", "--preset", "tiny"];
    all.extend_from_slice(args);
    all.extend(["--out", out.to_str().unwrap(), "--site-agent", agent.to_str().unwrap()]);
    tests::coordinator(&all)?.ok()
}

#[test]
fn the_demo_runs_the_study_and_writes_a_report_that_parses() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("demo");
    let run = demo(&["--sweeps"], &out)?;
    // The table on stdout: every organ, pooled and per site.
    assert!(run.stdout.contains("Dice, all target sites pooled"), "{}", run.stdout);
    assert!(run.stdout.contains("Site target-a") && run.stdout.contains("Site target-b"));
    assert!(run.stderr.contains("report written to"), "{}", run.stderr);
    let organs =
        site_agent::data::Manifest::load(&out.join("target-a/data/manifest.toml"))?.organs.len();

    let report = out.join("report");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json"))?)?;
    let transfer = &json["transfer"];
    assert_eq!(transfer["sites"].as_array().unwrap().len(), 2);
    assert_eq!(transfer["source_site"], "source-hospital");
    assert_eq!(transfer["pooled"]["organs"].as_array().unwrap().len(), organs);
    assert!(!json["sweep"].as_array().unwrap().is_empty(), "the sweep round is reported");
    assert!(!json["cases_sweep"].as_array().unwrap().is_empty());
    // Per-case Dice by case index only: no names or paths of the sites' files.
    let cases = json["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for c in cases {
        let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "arm",
                "case_index",
                "dice",
                "hd95_mm",
                "organ",
                "round",
                "site",
                "template",
                "train_cases",
                "trainable_layers"
            ]
        );
    }
    let text = serde_json::to_string(&json)?;
    for secret in tests::privacy::site_secrets(&out.join("target-a").join("data"))? {
        assert!(!text.contains(&secret), "the report carries {secret}");
    }

    let csv = std::fs::read_to_string(report.join("report.csv"))?;
    let mut rd = csv::Reader::from_reader(csv.as_bytes());
    let rows = rd.records().collect::<Result<Vec<_>, _>>()?;
    // (2 sites + pooled) x organs x 3 arms, then the sweep points.
    assert!(rows.len() > 3 * organs * 3, "{} CSV rows", rows.len());

    let html = std::fs::read_to_string(report.join("report.html"))?;
    // One box plot per organ, and one line plot per sweep.
    assert_eq!(html.matches("<svg").count(), organs + 2);
    assert!(!html.contains("could not be drawn"));
    Ok(())
}

/// `coordinator demo --federated`: three targets, two replicates of the transfer study,
/// FedAvg of the targets' tails and the cross-site matrix, in the report's every form.
#[test]
fn the_federated_demo_reports_the_matrix_the_bytes_and_the_replicates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("demo");
    let run = demo(&["--federated"], &out)?;
    for section in
        ["Replicates: 2 runs", "Federated fine-tuning", "Cross-site matrix", "Weights moved"]
    {
        assert!(run.stdout.contains(section), "{section}: {}", run.stdout);
    }
    let report = out.join("report");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json"))?)?;
    let m = &json["cross_eval"];
    let models: Vec<&str> =
        m["models"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(
        models,
        ["Model_S", "Model_ST/target-a", "Model_ST/target-b", "Model_ST/target-c", "Model_FT"]
    );
    assert_eq!(m["sites"].as_array().unwrap().len(), 4, "the source and three targets");
    assert_eq!(m["cells"].as_array().unwrap().len(), 5 * 4, "one cell per model and site");
    assert_eq!(json["federated"]["steps"].as_array().unwrap().len(), 6);
    assert_eq!(json["replicates"]["rounds"].as_array().unwrap().len(), 2);
    // The bytes: a full Model_S down to each target per replicate; tails otherwise.
    let full = json["model_bytes"].as_u64().unwrap();
    for t in json["traffic"].as_array().unwrap() {
        if t["template"] == "fedavg" {
            assert!(t["down"].as_u64().unwrap() * 5 < full, "{t}");
        }
    }
    let html = std::fs::read_to_string(report.join("report.html"))?;
    let organs =
        site_agent::data::Manifest::load(&out.join("target-a/data/manifest.toml"))?.organs.len();
    assert_eq!(html.matches("<table class=\"heat\"").count(), organs + 1, "mean and per organ");
    let csv = std::fs::read_to_string(report.join("report.csv"))?;
    assert!(csv.lines().filter(|l| l.starts_with("cross-eval,")).count() == 20 * (organs + 1));
    Ok(())
}
