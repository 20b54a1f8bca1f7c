//! Manifests: parsing, and validation errors that name the case and the file.

use std::path::Path;

use site_agent::data::{Manifest, Split, Volume, phantom, write_image, write_labels};

const ORGANS: &str = "[organs]\n1 = \"brainstem\"\n2 = \"mandible\"\n";

#[test]
fn parses_cases_relative_to_the_manifest() {
    let text = format!(
        "{ORGANS}[[cases]]\nid = \"c001\"\nimage = \"images/c001.nii.gz\"\nlabel = \"labels/c001.nii.gz\"\nsplit = \"train\"\n"
    );
    let m = Manifest::parse(&text, Path::new("/data/site/manifest.toml")).expect("valid");
    assert_eq!(m.organs.names(), ["brainstem", "mandible"]);
    assert_eq!(m.cases[0].image, Path::new("/data/site/images/c001.nii.gz"));
    assert_eq!(m.cases[0].split, Split::Train);
}

#[test]
fn refuses_bad_manifests_with_the_reason() {
    let case = "[[cases]]\nid = \"a\"\nimage = \"i\"\nlabel = \"l\"\nsplit = \"train\"\n";
    let bad = [
        (format!("{ORGANS}{case}{case}"), "appears twice"),
        (format!("[organs]\n0 = \"bg\"\n{case}"), "background"),
        (format!("[organs]\nx = \"bg\"\n{case}"), "not an integer"),
        (
            format!("{ORGANS}{}", case.replace("split = \"train\"", "split = \"val\"")),
            "unknown variant",
        ),
        (format!("{ORGANS}{case}color = 3\n"), "unknown field"),
        (ORGANS.to_owned(), "no [[cases]]"),
    ];
    for (text, want) in bad {
        let e = Manifest::parse(&text, Path::new("m.toml")).expect_err(want).to_string();
        assert!(e.contains(want) && e.contains("m.toml"), "expected '{want}' in: {e}");
    }
}

#[test]
fn check_names_the_case_and_file_for_each_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = Volume::new([4, 4, 2], [1.0, 1.0, 2.0], vec![0f32; 32]);
    let lab = Volume::new([4, 4, 2], [1.0, 1.0, 2.0], vec![0u16; 32]);
    write_image(&d.join("ok_i.nii"), &img).expect("write");
    write_labels(&d.join("ok_l.nii"), &lab).expect("write");
    let mut shape = lab.clone();
    shape.dims = [4, 2, 4];
    write_labels(&d.join("shape_l.nii"), &shape).expect("write");
    let mut outside = lab.clone();
    outside.data[3] = 9;
    write_labels(&d.join("outside_l.nii"), &outside).expect("write");
    let text = format!(
        "{ORGANS}\
         [[cases]]\nid = \"good\"\nimage = \"ok_i.nii\"\nlabel = \"ok_l.nii\"\nsplit = \"train\"\n\
         [[cases]]\nid = \"shape\"\nimage = \"ok_i.nii\"\nlabel = \"shape_l.nii\"\nsplit = \"train\"\n\
         [[cases]]\nid = \"outside\"\nimage = \"ok_i.nii\"\nlabel = \"outside_l.nii\"\nsplit = \"test\"\n\
         [[cases]]\nid = \"missing\"\nimage = \"nope.nii\"\nlabel = \"ok_l.nii\"\nsplit = \"test\"\n"
    );
    let path = d.join("manifest.toml");
    std::fs::write(&path, text).expect("write manifest");
    let m = Manifest::load(&path).expect("parses");
    let errors: Vec<String> = m.check().iter().map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors[0].contains("\"shape\"")
            && errors[0].contains("shape_l.nii")
            && errors[0].contains("differs")
    );
    assert!(errors[1].contains("\"outside\"") && errors[1].contains("[9]"));
    assert!(errors[2].contains("\"missing\"") && errors[2].contains("nope.nii"));
}

#[test]
fn nan_voxels_are_refused_naming_the_case() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // A float32 image with one NaN, written through the nifti crate directly.
    let mut data = vec![0f32; 8];
    data[2] = f32::NAN;
    let arr = ndarray_from(data);
    nifti::writer::WriterOptions::new(d.join("nan.nii")).write_nifti(&arr).expect("write");
    // The label through the same writer, so both carry the same (pixdim-only) geometry.
    let lab = ndarray_from(vec![0f32; 8]).mapv(|v| v as u8);
    nifti::writer::WriterOptions::new(d.join("l.nii")).write_nifti(&lab).expect("write");
    let text = format!(
        "{ORGANS}[[cases]]\nid = \"n1\"\nimage = \"nan.nii\"\nlabel = \"l.nii\"\nsplit = \"train\"\n"
    );
    let m = Manifest::parse(&text, &d.join("m.toml")).expect("parses");
    let e = m.check().remove(0).to_string();
    assert!(e.contains("\"n1\"") && e.contains("nan.nii") && e.contains("NaN"), "{e}");
}

fn ndarray_from(data: Vec<f32>) -> ndarray::Array3<f32> {
    use ndarray::ShapeBuilder;
    ndarray::Array3::from_shape_vec((2, 2, 2).f(), data).expect("shape")
}

#[test]
fn phantom_centers_write_valid_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = phantom::write_center(phantom::Center::TargetB, 3, 1, 5, dir.path()).expect("writes");
    assert!(m.check().is_empty());
    let reread = Manifest::load(&m.path).expect("reads back");
    assert_eq!(reread.cases.len(), 3);
    assert_eq!(reread.cases_in(Split::Test).count(), 1);
    let test = reread.load_split(Split::Test).expect("loads");
    let case = &test.cases[0];
    let p = phantom::Center::TargetB.profile();
    assert_eq!(case.image.dims[0], p.in_plane);
    assert_eq!(case.image.spacing()[2], p.slice_mm);
    for (label, _) in reread.organs.iter() {
        assert!(case.labels.data.contains(&label), "organ {label} drawn in every phantom");
    }
}
