//! DICOM out and privacy: an exported RTSTRUCT imports back to the same voxels and pydicom
//! reads it, overlapping structures follow the documented rule, a structure set of another
//! patient or an empty prediction is refused, and nothing an import writes names a patient.

use std::path::{Path, PathBuf};

use shared::structures::{KNOWN_ORGANS, NameMap};
use site_agent::data::{Manifest, Split, phantom, read_labels};
use site_agent::dicom::import::Source;
use site_agent::dicom::rtstruct::RtStruct;
use site_agent::dicom::series::CtSeries;
use site_agent::dicom::synthetic::{SeriesIds, write_case};

use crate::dicom::{dice, import};

fn phantom_export(root: &Path, n: usize, secret: &str) -> Vec<(PathBuf, SeriesIds)> {
    (0..n)
        .map(|i| {
            let (image, labels) = phantom::center_case(phantom::Center::TargetB, 9, i);
            let ids = SeriesIds::new(&format!("{secret}-{i}"), &format!("Doe^{secret}{i}"));
            let dir = root.join(format!("{secret}-folder-{i}"));
            write_case(&image, &labels, &ids, &dir).expect("export");
            (dir, ids)
        })
        .collect()
}

#[test]
fn export_then_import_gives_back_every_organs_voxels() {
    let root = tempfile::tempdir().expect("tempdir");
    let (dir, ids) = phantom_export(root.path(), 1, "RT").remove(0);
    let out = root.path().join("imported");
    import(
        Source::Case { ct: dir.join("CT"), rtstruct: dir.join("RS.dcm") },
        &out,
        NameMap::builtin(),
    )
    .expect("imports");
    let (_, truth) = phantom::center_case(phantom::Center::TargetB, 9, 0);
    let back = read_labels(&out.join("labels/case-001.nii.gz")).expect("labels");
    assert_eq!(back.dims, truth.dims);
    for o in &KNOWN_ORGANS {
        let a: Vec<bool> = truth.data.iter().map(|&l| l == o.label).collect();
        let b: Vec<bool> = back.data.iter().map(|&l| l == o.label).collect();
        let d = dice(&a, &b);
        assert!(d >= 0.98, "{}: Dice {d}", o.name);
        assert_eq!(a, b, "{}: pixel-edge contours fill back exactly", o.name);
    }
    // Every contour references a slice of this CT, the structure set this series and study.
    let ct = CtSeries::read_dir(&dir.join("CT")).expect("series");
    let sops: Vec<&str> = ct.slices.iter().map(|s| s.sop_instance_uid.as_str()).collect();
    let rs = site_agent::dicom::open(&dir.join("RS.dcm")).expect("open");
    // One reference per contour: at least one per organ on each slice it appears on.
    let min_refs: usize = KNOWN_ORGANS
        .iter()
        .map(|o| (0..truth.dims[2]).filter(|&k| truth.slice(k).contains(&o.label)).count())
        .sum();
    let mut refs = 0;
    for roi in site_agent::dicom::items(&rs, dicom_dictionary_std::tags::ROI_CONTOUR_SEQUENCE) {
        for c in site_agent::dicom::items(roi, dicom_dictionary_std::tags::CONTOUR_SEQUENCE) {
            for img in
                site_agent::dicom::items(c, dicom_dictionary_std::tags::CONTOUR_IMAGE_SEQUENCE)
            {
                let uid = site_agent::dicom::text(
                    img,
                    dicom_dictionary_std::tags::REFERENCED_SOP_INSTANCE_UID,
                );
                assert!(sops.contains(&uid.as_deref().unwrap_or("")), "{uid:?}");
                refs += 1;
            }
        }
    }
    assert!(
        refs >= min_refs && min_refs > 20,
        "{refs} contour references, {min_refs} organ slices"
    );
    let rt = RtStruct::read(&dir.join("RS.dcm")).expect("parse");
    assert_eq!(rt.referenced_series, vec![ids.series_uid.clone()]);
    assert_eq!(rt.frames_of_reference, vec![ids.frame_of_reference_uid.clone()]);
    pydicom_reads(&dir, &sops, min_refs);
}

/// pydicom (where `FEDTUNE_PYTHON` or `python3` has it) reads the exported RTSTRUCT: its ROI
/// names, and that every contour image reference is a CT slice.
fn pydicom_reads(dir: &Path, sops: &[&str], min_refs: usize) {
    let python = std::env::var("FEDTUNE_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import sys, pydicom\n\
        rs = pydicom.dcmread(sys.argv[1])\n\
        print(','.join(r.ROIName for r in rs.StructureSetROISequence))\n\
        for c in rs.ROIContourSequence:\n\
        \x20   for cs in c.ContourSequence:\n\
        \x20       for i in cs.ContourImageSequence: print(i.ReferencedSOPInstanceUID)\n";
    let out =
        std::process::Command::new(&python).arg("-c").arg(script).arg(dir.join("RS.dcm")).output();
    let Some(out) = out.ok().filter(|o| o.status.success()) else {
        let why = format!(
            "dicom_export.rs: the pydicom check, {python} has no pydicom (pip install pydicom, or \
             set FEDTUNE_PYTHON)"
        );
        eprintln!("skipped: {why}");
        // Listed for `.ci/run`, which prints the skips after the suite.
        let list = Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests.txt");
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(list) {
            let _ = std::io::Write::write_all(&mut f, format!("{why}\n").as_bytes());
        }
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let names = lines.next().unwrap_or("");
    let want: Vec<&str> = KNOWN_ORGANS.iter().map(|o| o.tg263).collect();
    assert_eq!(names, want.join(","));
    let mut n = 0;
    for uid in lines {
        assert!(sops.contains(&uid), "pydicom: reference {uid} is not a CT slice");
        n += 1;
    }
    assert!(n >= min_refs, "pydicom found {n} references");
    eprintln!(
        "pydicom read the RTSTRUCT: {} ROIs, {n} contour references, all to CT slices",
        want.len()
    );
}

#[test]
fn nothing_written_by_an_import_names_a_patient_a_uid_or_a_folder() {
    let root = tempfile::tempdir().expect("tempdir");
    let export = root.path().join("export");
    let cases = phantom_export(&export, 3, "SECRET4711");
    // A damaged structure set and a stray text file skip themselves, not the export.
    let rs = std::fs::read(cases[0].0.join("RS.dcm")).expect("rs");
    std::fs::write(export.join("damaged.dcm"), &rs[..rs.len() / 2]).expect("write");
    std::fs::write(export.join("README.txt"), "exported by the TPS").expect("write");
    let out = root.path().join("out");
    // A key file left readable by an earlier, failed import is made private again.
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("patient-key.local.toml"), "stale").expect("write");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let open = std::fs::Permissions::from_mode(0o644);
        std::fs::set_permissions(out.join("patient-key.local.toml"), open).expect("chmod");
    }
    let report = import(Source::Root(export.clone()), &out, NameMap::builtin()).expect("imports");
    assert_eq!(report.cases.len(), 3);
    let skipped = report.not_imported.join("\n");
    assert!(
        skipped.contains("2 files are not readable DICOM") && skipped.contains("README.txt"),
        "{skipped}"
    );
    let m = Manifest::load(&report.manifest).expect("manifest");
    assert!(m.check().is_empty());
    assert_eq!((m.cases_in(Split::Train).count(), m.cases_in(Split::Test).count()), (2, 1));
    let mut secrets = vec!["SECRET4711".to_owned(), "Doe".to_owned()];
    for (dir, ids) in &cases {
        secrets.extend([
            ids.study_uid.clone(),
            ids.series_uid.clone(),
            ids.frame_of_reference_uid.clone(),
        ]);
        let ct = CtSeries::read_dir(&dir.join("CT")).expect("series");
        secrets.extend(ct.slices.iter().map(|s| s.sop_instance_uid.clone()));
        secrets.extend(RtStruct::read(&dir.join("RS.dcm")).expect("rs").sop_instance_uid);
    }
    let mut checked = 0;
    for path in files_under(&out) {
        if path == report.key_file {
            continue;
        }
        let raw = std::fs::read(&path).expect("read");
        let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut flate2_decoder(&raw), &mut v).expect("gunzip");
            v
        } else {
            raw
        };
        for s in &secrets {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                "{} holds {s}",
                path.display()
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 7, "manifest, 3 images, 3 label maps");
    let key = std::fs::read_to_string(&report.key_file).expect("key");
    assert!(key.contains("SECRET4711-0") && key.contains(&cases[0].1.series_uid));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&report.key_file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only the site's operator reads the key");
    }
}

#[test]
fn overlapping_structures_give_the_voxels_to_the_smaller_and_say_so() {
    use dicom_core::value::DataSetSequence;
    use dicom_core::{DataElement, VR};
    use dicom_dictionary_std::tags;
    use site_agent::dicom::export::write_rtstruct;
    let root = tempfile::tempdir().expect("tempdir");
    let (dir, _) = phantom_export(root.path(), 1, "OVL").remove(0);
    let mut ct = CtSeries::read_dir(&dir.join("CT")).expect("series");
    ct.read_image().expect("pixels");
    let [w, h, nz] = ct.dims();
    // A 10 x 10 parotid and a 4 x 4 brainstem inside it on the middle slice.
    let square = |label: u16, lo: usize, n: usize| {
        let mut v = vec![0u16; w * h * nz];
        for y in lo..lo + n {
            for x in lo..lo + n {
                v[(nz / 2) * w * h + y * w + x] = label;
            }
        }
        v
    };
    let organs = shared::structures::standard_organ_map();
    let (a, b) = (root.path().join("a.dcm"), root.path().join("b.dcm"));
    write_rtstruct(&ct, &square(4, 20, 10), &organs, &a).expect("parotid");
    write_rtstruct(&ct, &square(1, 23, 4), &organs, &b).expect("brainstem");
    // One structure set holding both ROIs (numbered 4 and 1 by their organs).
    let mut merged = site_agent::dicom::open(&a).expect("a");
    let other = site_agent::dicom::open(&b).expect("b");
    for tag in [
        tags::STRUCTURE_SET_ROI_SEQUENCE,
        tags::ROI_CONTOUR_SEQUENCE,
        tags::RTROI_OBSERVATIONS_SEQUENCE,
    ] {
        let mut items = site_agent::dicom::items(&merged, tag).to_vec();
        items.extend_from_slice(site_agent::dicom::items(&other, tag));
        merged.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
    }
    let rs = root.path().join("merged.dcm");
    merged.write_to_file(&rs).expect("write");
    let out = root.path().join("out");
    let report =
        import(Source::Case { ct: dir.join("CT"), rtstruct: rs }, &out, NameMap::builtin())
            .expect("imports");
    let c = &report.cases[0];
    assert_eq!(c.organs["parotid_l"].1, 100);
    assert_eq!(c.organs["brainstem"].1, 16);
    assert_eq!(
        c.overlaps,
        vec!["16 voxels drawn in both parotid_l and brainstem: given to brainstem".to_owned()]
    );
    let labels = read_labels(&out.join("labels/case-001.nii.gz")).expect("labels");
    let count = |l: u16| labels.data.iter().filter(|&&v| v == l).count();
    assert_eq!((count(4), count(1)), (84, 16));
}

#[test]
fn an_empty_prediction_writes_no_structure_set() {
    let root = tempfile::tempdir().expect("tempdir");
    let (dir, _) = phantom_export(root.path(), 1, "EMPTY").remove(0);
    let ct = CtSeries::read_dir(&dir.join("CT")).expect("series");
    let [w, h, nz] = ct.dims();
    let path = root.path().join("none.dcm");
    let err = site_agent::dicom::export::write_rtstruct(
        &ct,
        &vec![0u16; w * h * nz],
        &shared::structures::standard_organ_map(),
        &path,
    )
    .expect_err("nothing to contour")
    .to_string();
    assert!(err.contains("no organ"), "{err}");
    assert!(!path.exists());
}

#[test]
fn a_structure_set_of_another_patients_ct_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let cases = phantom_export(root.path(), 2, "OTHER");
    let out = root.path().join("out");
    let err = import(
        Source::Case { ct: cases[0].0.join("CT"), rtstruct: cases[1].0.join("RS.dcm") },
        &out,
        NameMap::builtin(),
    )
    .expect_err("another series");
    assert!(
        err.contains("was drawn on another CT")
            && err.contains(&cases[1].1.series_uid)
            && err.contains(&cases[0].1.series_uid),
        "{err}"
    );
    assert!(!out.join("manifest.toml").exists());
}
fn flate2_decoder(raw: &[u8]) -> impl std::io::Read + '_ {
    flate2::read::MultiGzDecoder::new(raw)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() { stack.push(p) } else { out.push(p) }
        }
    }
    out.sort();
    out
}
