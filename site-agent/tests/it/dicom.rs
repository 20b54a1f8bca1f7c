//! DICOM in and out: real files written by other software (values from
//! `tests/reference/dicom_reference.py`: rt-utils and pydicom), generated series with every
//! refusal, the export -> import round trip, and no identifier in anything the import writes.

use std::path::{Path, PathBuf};

use serde_json::Value;
use shared::data::{Manifest, Split, phantom, read_labels};
use shared::structures::{KNOWN_ORGANS, NameMap};
use site_agent::dicom::import::{ImportOptions, Source, run};
use site_agent::dicom::rtstruct::RtStruct;
use site_agent::dicom::series::CtSeries;
use site_agent::dicom::synthetic::{SeriesIds, SliceSpec, write_case, write_slice};

fn reference() -> Value {
    let text = include_str!("../reference/dicom_reference.json");
    serde_json::from_str(text).expect("reference json")
}

fn names(toml: &str) -> NameMap {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("names.toml");
    std::fs::write(&p, toml).expect("write");
    NameMap::with_file(&p).expect("names file")
}

fn import(
    source: Source,
    out: &Path,
    names: NameMap,
) -> Result<site_agent::dicom::import::ImportReport, String> {
    run(&ImportOptions { source, out: out.to_owned(), names, test: None })
        .map_err(|e| e.to_string())
}

fn dice(a: &[bool], b: &[bool]) -> f64 {
    let both = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
    let n = a.iter().filter(|x| **x).count() + b.iter().filter(|x| **x).count();
    2.0 * both as f64 / n as f64
}

#[test]
fn a_clinical_body_contour_matches_rt_utils() {
    let Some(dir) = crate::testdata("dicom/dicompyler") else { return };
    let out = tempfile::tempdir().expect("tempdir");
    // This breast case names no head-and-neck organ; a center's names file maps BODY to one
    // so that it is imported, and Lt Lung, whose contours all lie off the one CT slice.
    let report = import(
        Source::Case { ct: dir.clone(), rtstruct: dir.join("rtss.dcm") },
        out.path(),
        names("[names]\nbrainstem = [\"BODY\"]\nparotid_l = [\"Lt Lung\"]\n"),
    )
    .expect("imports");
    let case = &report.cases[0];
    assert_eq!(case.dims, [512, 512, 1]);
    assert!(case.unmatched.contains(&"Heart".to_owned()), "{:?}", case.unmatched);
    assert!(case.missing.contains(&"parotid_l".to_owned()));
    let off: Vec<_> = case.skipped.iter().filter(|s| s.starts_with("Lt Lung:")).collect();
    assert!(off.iter().any(|s| s.contains("planes that match no CT slice")), "{:?}", case.skipped);

    let labels = read_labels(&out.path().join("labels/case-001.nii.gz")).expect("labels");
    let ours: Vec<bool> = labels.data.iter().map(|&l| l == 1).collect();
    let r = &reference()["dicompyler_body"];
    let mut theirs = vec![false; 512 * 512];
    for run in r["runs"].as_array().expect("runs") {
        let (start, len) =
            (run[0].as_u64().expect("n") as usize, run[1].as_u64().expect("n") as usize);
        theirs[start..start + len].fill(true);
    }
    // rt-utils' mask is (row, column), ours column fastest then row: the same flat order.
    let d = dice(&ours, &theirs);
    let (n_ours, n_theirs) =
        (ours.iter().filter(|b| **b).count(), r["voxels"].as_u64().expect("n"));
    eprintln!("BODY: {n_ours} voxels here, {n_theirs} from {}; Dice {d:.4}", r["tool"]);
    assert!(d >= 0.98, "Dice {d} against rt-utils");
}

#[test]
fn slices_are_ordered_by_position_not_instance_number() {
    let Some(dir) = crate::testdata("dicom/pydicom/CT5N") else { return };
    let r = &reference()["ct5n"];
    let mut ct = CtSeries::read_dir(&dir).expect("series");
    let numbers: Vec<i64> = ct.slices.iter().map(|s| s.instance_number.expect("number")).collect();
    let want: Vec<i64> = r["instance_numbers"]
        .as_array()
        .expect("a")
        .iter()
        .map(|v| v.as_i64().expect("i"))
        .collect();
    assert_eq!(numbers, want, "pydicom's order by position");
    check_series(&mut ct, r);
}

#[test]
fn hu_and_geometry_of_a_single_slice_match_pydicom() {
    let Some(dir) = crate::testdata("dicom/pydicom") else { return };
    // The folder also holds rtstruct.dcm (not a CT) and CT5N/ (a folder): both are skipped.
    let mut ct = CtSeries::read_dir(&dir).expect("series");
    check_series(&mut ct, &reference()["ct_small"]);
}

fn check_series(ct: &mut CtSeries, r: &Value) {
    let image = ct.read_image().expect("pixels");
    let shape: Vec<usize> = r["shape_kji"]
        .as_array()
        .expect("a")
        .iter()
        .map(|v| v.as_u64().expect("u") as usize)
        .collect();
    assert_eq!(image.dims, [shape[2], shape[1], shape[0]]);
    for (k, want) in r["slice_sums"].as_array().expect("a").iter().enumerate() {
        let sum: f64 = image.slice(k).iter().map(|&v| f64::from(v)).sum();
        assert_eq!(sum, want.as_f64().expect("f"), "slice {k}");
    }
    assert_eq!(f64::from(image.data[image.index(3, 2, 0)]), r["v_k0_j2_i3"].as_f64().expect("f"));
    assert_eq!(f64::from(*image.data.last().expect("voxels")), r["v_last"].as_f64().expect("f"));
    // pydicom's affine is LPS; ours RAS: x and y rows negated.
    for (row, want) in r["affine_lps"].as_array().expect("a").iter().enumerate() {
        for (col, w) in want.as_array().expect("a").iter().enumerate() {
            let sign = if row < 2 { -1.0 } else { 1.0 };
            let got = sign * image.affine.0[row][col];
            assert!(
                (got - w.as_f64().expect("f")).abs() < 1e-6,
                "affine[{row}][{col}] {got} vs {w}"
            );
        }
    }
}

#[test]
fn a_structure_set_without_file_meta_parses_and_another_cts_is_refused() {
    let (Some(rs), Some(ct5n)) =
        (crate::testdata("dicom/pydicom/rtstruct.dcm"), crate::testdata("dicom/pydicom/CT5N"))
    else {
        return;
    };
    let rt = RtStruct::read(&rs).expect("parses without preamble and file meta");
    let summary: Vec<(String, Vec<String>)> = rt
        .rois
        .iter()
        .map(|r| (r.name.clone(), r.contours.iter().map(|c| c.geometric_type.clone()).collect()))
        .collect();
    assert_eq!(summary[0], ("patient".into(), vec!["CLOSED_PLANAR".to_owned(); 3]));
    assert_eq!(summary[1], ("Isocenter 1".into(), vec!["POINT".to_owned()]));
    let ct = CtSeries::read_dir(&ct5n).expect("series");
    let point = site_agent::dicom::rtstruct::rasterize(&rt.rois[1], &ct);
    assert_eq!(point.voxels, 0);
    assert!(point.skipped[0].contains("POINT"), "{:?}", point.skipped);
    let out = tempfile::tempdir().expect("tempdir");
    let err = import(Source::Case { ct: ct5n, rtstruct: rs }, out.path(), NameMap::builtin())
        .expect_err("another CT's structure set");
    assert!(
        err.contains("was drawn on another CT")
            && err.contains("1.2.826.0.1.3680043.8.498.2010020400001.2.1.1"),
        "{err}"
    );
    assert!(!out.path().join("manifest.toml").exists(), "nothing written for a refused case");
}

/// A generated series: one slice per `(height, instance number)`, 6 x 4 pixels whose values
/// encode the slice's height, optionally tilted or with one slice in another orientation.
fn write_generated(
    dir: &Path,
    slices: &[(f64, i64)],
    tilt_mm_per_slice: f64,
    odd_orientation: Option<usize>,
) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let ids = SeriesIds::new("GEN-1", "Generated^Series");
    for (n, &(z, instance)) in slices.iter().enumerate() {
        let hu: Vec<f32> = (0..24).map(|p| (z * 10.0) as f32 + p as f32).collect();
        let orientation = if odd_orientation == Some(n) {
            [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
        } else {
            [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        };
        write_slice(
            &dir.join(format!("IMG{n:03}")),
            &SliceSpec {
                ids: &ids,
                sop_instance_uid: format!("1.2.3.{n}"),
                instance_number: instance,
                position: [-10.0, 20.0 + z * tilt_mm_per_slice, z],
                orientation,
                pixel_spacing: [0.8, 0.7],
                slice_thickness: 2.0,
                rows: 4,
                columns: 6,
                hu: &hu,
            },
        )
        .expect("write slice");
    }
}

#[test]
fn generated_series_are_ordered_or_refused_with_the_reason() {
    let root = tempfile::tempdir().expect("tempdir");
    let case = |name: &str,
                slices: &[(f64, i64)],
                tilt: f64,
                odd: Option<usize>|
     -> Result<CtSeries, String> {
        let dir = root.path().join(name);
        write_generated(&dir, slices, tilt, odd);
        CtSeries::read_dir(&dir).map_err(|e| e.to_string())
    };
    // Instance numbers shuffled against position: the volume follows position.
    let shuffled = [(4.0, 1), (0.0, 5), (8.0, 2), (2.0, 3), (6.0, 4)];
    let mut ct = case("shuffled", &shuffled, 0.0, None).expect("orders by position");
    let image = ct.read_image().expect("pixels");
    let firsts: Vec<f32> = (0..5).map(|k| image.slice(k)[0]).collect();
    assert_eq!(firsts, [0.0, 20.0, 40.0, 60.0, 80.0]);
    assert_eq!(image.spacing(), [0.7, 0.8, 2.0]);

    let err =
        case("missing", &[(0.0, 1), (2.0, 2), (6.0, 3), (8.0, 4)], 0.0, None).expect_err("gap");
    assert!(err.contains("irregular slice spacing") && err.contains("4.000 mm"), "{err}");
    let err =
        case("duplicate", &[(0.0, 1), (2.0, 2), (2.0, 3), (4.0, 4)], 0.0, None).expect_err("dup");
    assert!(err.contains("same position") && err.contains("2.000"), "{err}");
    let err = case("tilt", &[(0.0, 1), (2.0, 2), (4.0, 3)], 0.5, None).expect_err("tilt");
    // 1 mm sideways for every 2 mm up: atan(1/2).
    assert!(err.contains("gantry tilt of 26.6 degrees"), "{err}");
    let err = case("mixed", &[(0.0, 1), (2.0, 2), (4.0, 3)], 0.0, Some(1)).expect_err("mixed");
    assert!(err.contains("mixed slice orientations"), "{err}");
}

#[test]
fn pixel_data_that_cannot_be_decoded_is_refused_naming_the_transfer_syntax() {
    use dicom_core::value::PixelFragmentSequence;
    use dicom_core::{DataElement, VR};
    use dicom_dictionary_std::tags;
    let dir = tempfile::tempdir().expect("tempdir");
    write_generated(dir.path(), &[(0.0, 1)], 0.0, None);
    // The same slice, its pixels now claiming JPEG 2000 (not built in) in one garbage fragment.
    let path = dir.path().join("IMG000");
    let mut obj = site_agent::dicom::open(&path).expect("open").into_inner();
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PixelFragmentSequence::new_fragments(vec![vec![0xffu8; 64]]),
    ));
    let j2k = "1.2.840.10008.1.2.4.90";
    obj.with_meta(dicom_object::meta::FileMetaTableBuilder::new().transfer_syntax(j2k))
        .expect("meta")
        .write_to_file(&path)
        .expect("write");
    let mut ct = CtSeries::read_dir(dir.path()).expect("headers read");
    let err = ct.read_image().expect_err("cannot decode").to_string();
    assert!(
        err.contains(j2k) && err.contains("cannot be decoded") && err.contains("uncompressed"),
        "{err}"
    );
}

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
        eprintln!(
            "skipped the pydicom check: {python} has no pydicom (pip install pydicom, or set FEDTUNE_PYTHON)"
        );
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
