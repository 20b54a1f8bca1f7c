//! A hospital's DICOM export, end to end: import to a checked manifest with one command,
//! train and predict on it, contours back as an RTSTRUCT that imports to the same voxels, and
//! an agent on the imported data whose every outbound message is free of the export's
//! identifiers.

use std::path::{Path, PathBuf};

use anyhow::Result;
use proto::pb;
use tests::federation::Federation;
use tests::privacy::{assert_sends_none_of, site_secrets};
use tests::site_agent;

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

#[test]
fn a_dicom_export_becomes_a_manifest_and_predictions_come_back_as_rtstruct() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let export = d.join("export");
    let args = ["phantom", "--center", "target-a", "--cases", "4", "--seed", "5", "--dicom"];
    site_agent(&[&args[..], &["--out", s(&export)]].concat())?.ok()?;
    let data = d.join("data");
    let imported = site_agent(&["import-dicom", "--root", s(&export), "--out", s(&data)])?.ok()?;
    assert!(
        imported.stdout.contains("imported 4 cases (3 train, 1 test)")
            && imported.stdout.contains("parotid_l"),
        "{}",
        imported.stdout
    );
    let m = data.join("manifest.toml");
    let check = site_agent(&["check-data", "--manifest", s(&m)])?.ok()?;
    assert!(check.stdout.contains("ok: 4 cases (3 train, 1 test), 9 organs"), "{}", check.stdout);
    let w = d.join("m.safetensors");
    site_agent(&[
        "train",
        "--manifest",
        s(&m),
        "--config",
        "tiny",
        "--epochs",
        "15",
        "--batch-size",
        "8",
        "--out",
        s(&w),
    ])?
    .ok()?;

    // Predict on one patient's CT series, straight from DICOM, with an RTSTRUCT out.
    let ct = export.join("patient-002").join("CT");
    let (pred, rs) = (d.join("pred.nii.gz"), d.join("pred-rs.dcm"));
    let out = site_agent(&[
        "predict",
        "--weights",
        s(&w),
        "--image",
        s(&ct),
        "--out",
        s(&pred),
        "--rtstruct-out",
        s(&rs),
    ])?
    .ok()?;
    assert!(out.stdout.contains("RTSTRUCT on the CT"), "{}", out.stdout);
    // The RTSTRUCT imports back onto the same CT as the same voxels.
    let back = d.join("back");
    site_agent(&["import-dicom", "--ct", s(&ct), "--rtstruct", s(&rs), "--out", s(&back)])?.ok()?;
    let predicted = site_agent::data::read_labels(&pred)?;
    let reimported = site_agent::data::read_labels(&back.join("labels/case-001.nii.gz"))?;
    assert_eq!(reimported.dims, predicted.dims);
    assert_eq!(reimported.affine, predicted.affine);
    let organs_predicted = shared::structures::KNOWN_ORGANS
        .iter()
        .filter(|o| predicted.data.contains(&o.label))
        .count();
    assert!(
        organs_predicted >= 3,
        "{organs_predicted} organs predicted: too few to test the export"
    );
    for o in &shared::structures::KNOWN_ORGANS {
        let (a, b): (Vec<bool>, Vec<bool>) = predicted
            .data
            .iter()
            .zip(&reimported.data)
            .map(|(&p, &r)| (p == o.label, r == o.label))
            .unzip();
        assert_eq!(a, b, "{}: exported and re-imported voxels", o.name);
    }

    // An RTSTRUCT needs the CT's slices: a NIfTI input is refused with what to do.
    let nifti = data.join("images/case-001.nii.gz");
    let refused = site_agent(&[
        "predict",
        "--weights",
        s(&w),
        "--image",
        s(&nifti),
        "--out",
        s(&pred),
        "--rtstruct-out",
        s(&rs),
    ])?;
    assert_ne!(refused.code, Some(0));
    assert!(refused.stderr.contains("folder of the DICOM CT series"), "{}", refused.stderr);
    Ok(())
}

/// Every identifier a DICOM export holds: patient, UIDs of studies, series, frames of
/// reference, slices and structure sets, and folder names.
fn export_identifiers(export: &Path) -> Result<Vec<String>> {
    use site_agent::dicom::{rtstruct::RtStruct, series::CtSeries};
    let mut out = vec!["PHANTOM".to_owned(), "Phantom^".to_owned()];
    for p in std::fs::read_dir(export)? {
        let p: PathBuf = p?.path();
        out.push(p.file_name().expect("name").to_string_lossy().into_owned());
        let mut ct = CtSeries::read_dir(&p.join("CT"))?;
        ct.read_image()?;
        out.extend([ct.series_uid.clone(), ct.study_uid.clone()]);
        out.extend(ct.frame_of_reference_uid.clone());
        out.extend(ct.patient_id.clone());
        out.extend(ct.slices.iter().map(|s| s.sop_instance_uid.clone()));
        out.extend(RtStruct::read(&p.join("RS.dcm"))?.sop_instance_uid);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_imported_dicom_sends_no_identifier() -> Result<()> {
    let mut fed = Federation::builder().sites(1).without_agents().start().await?;
    let site = fed.sites[0].clone();
    let data = fed.data_dir(&site);
    std::fs::remove_dir_all(&data)?;
    let export = data.with_file_name("dicom-export");
    site_agent(&[
        "phantom",
        "--center",
        "target-b",
        "--cases",
        "3",
        "--seed",
        "8",
        "--dicom",
        "--out",
        s(&export),
    ])?
    .ok()?;
    site_agent(&["import-dicom", "--root", s(&export), "--out", s(&data)])?.ok()?;
    fed.start_agent(&site)?;
    fed.study("imported", "tiny").await?;
    let spec = pb::TaskSpec { kind: pb::TaskKind::Evaluate as i32, ..Default::default() };
    let round = fed.start_round("imported", spec).await?;
    let info = fed.wait_round(&round, 240).await?;
    assert_eq!(info.state, pb::RoundState::Completed as i32, "{info:?}");
    let results = fed.results(&round).await?;
    let res = results.results[0].result.as_ref().expect("result");
    let organs: std::collections::BTreeSet<&str> =
        res.arms.iter().flat_map(|a| &a.scores).map(|c| c.organ.as_str()).collect();
    assert_eq!(organs.len(), 9, "scores for every organ of the imported data");
    for a in &mut fed.agents {
        a.stop().await?;
    }
    let mut secrets = export_identifiers(&export)?;
    secrets.extend(site_secrets(&data)?);
    let (entries, _) = site_agent::agent::audit::AuditLog::read(&fed.storage(&site))?;
    assert!(entries.len() >= 4, "{} audited messages", entries.len());
    assert_sends_none_of(&site, &entries, &secrets);
    eprintln!("{} outbound messages checked against {} identifiers", entries.len(), secrets.len());
    fed.shutdown().await
}
