//! DICOM in: real files written by other software (values from
//! `tests/reference/dicom_reference.py`: rt-utils and pydicom), and generated series with every
//! refusal.

use std::path::Path;

use serde_json::Value;
use shared::structures::NameMap;
use site_agent::data::read_labels;
use site_agent::dicom::import::{ImportOptions, Source, run};
use site_agent::dicom::rtstruct::RtStruct;
use site_agent::dicom::series::CtSeries;
use site_agent::dicom::synthetic::{SeriesIds, SliceSpec, write_slice};

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

pub(crate) fn import(
    source: Source,
    out: &Path,
    names: NameMap,
) -> Result<site_agent::dicom::import::ImportReport, String> {
    run(&ImportOptions { source, out: out.to_owned(), names, test: None })
        .map_err(|e| e.to_string())
}

pub(crate) fn dice(a: &[bool], b: &[bool]) -> f64 {
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
