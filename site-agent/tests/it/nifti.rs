//! The NIfTI reader on files written by nibabel (values printed by reference_values.py: nibabel
//! reoriented to LPS with `nibabel.orientations`), and the writer through round trips.

use std::io::Write;

use site_agent::data::{Volume, read_image, read_labels, write_image, write_labels};

#[test]
fn reads_big_endian_int16() {
    let Some(path) = crate::testdata("nifti/anatomical.nii") else { return };
    let v = read_image(&path).expect("anatomical.nii reads");
    // Stored LAS (sform code 2); read as LPS: rows flipped.
    assert_eq!(v.dims, [33, 41, 25]);
    assert_eq!(v.spacing(), [2.0, 2.0, 2.0]);
    assert_eq!(v.data.iter().map(|&x| x as f64).sum::<f64>(), 284166082.0);
    assert_eq!(v.data[0], 5991.0);
    assert_eq!(v.data[v.index(1, 2, 3)], 5400.0);
    assert_eq!(*v.data.last().expect("non-empty"), 9453.0);
    assert_eq!(
        v.affine.0,
        [[-2.0, 0.0, 0.0, 32.0], [0.0, -2.0, 0.0, 40.0], [0.0, 0.0, 2.0, -16.0]]
    );
}

#[test]
fn reads_gzip_with_sform_and_anisotropic_spacing() {
    let Some(path) = crate::testdata("nifti/standard.nii.gz") else { return };
    let v = read_labels(&path).expect("standard.nii.gz reads");
    // Stored RAS (sform only); read as LPS: x and y flipped.
    assert_eq!(v.dims, [4, 5, 7]);
    assert_eq!(v.spacing(), [1.0, 3.0, 2.0]);
    assert_eq!(v.data.iter().map(|&x| x as u64).sum::<u64>(), 7650);
    assert_eq!(v.data[v.index(2, 2, 3)], 255);
    assert_eq!(v.data[v.index(1, 2, 3)], 0);
    assert_eq!(v.data[v.index(0, 0, 1)], 255);
    assert_eq!(v.affine.0, [[-1.0, 0.0, 0.0, 3.0], [0.0, -3.0, 0.0, 12.0], [0.0, 0.0, 2.0, 0.0]]);
}

#[test]
fn rejects_4d_with_a_clear_error() {
    let Some(path) = crate::testdata("nifti/example4d.nii.gz") else { return };
    let err = read_image(&path).expect_err("4-D is refused").to_string();
    assert!(err.contains("4-D") && err.contains("example4d.nii.gz"), "{err}");
}

fn sample_volume() -> Volume<f32> {
    let dims = [5, 4, 3];
    let data = (0..60).map(|i| (i as f32 * 7.0) - 200.0).collect();
    Volume::new(dims, [0.8, 0.9, 2.5], data)
}

#[test]
fn images_and_labels_round_trip_in_both_forms() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["a.nii", "b.nii.gz"] {
        let p = dir.path().join(name);
        let img = sample_volume();
        write_image(&p, &img).expect("write image");
        assert_eq!(read_image(&p).expect("read image"), img);
        let labels = img.with_data((0..60).map(|i| (i % 7) as u16).collect());
        write_labels(&p, &labels).expect("write labels");
        assert_eq!(read_labels(&p).expect("read labels"), labels);
        let wide =
            Volume { data: labels.data.iter().map(|&l| l * 1000).collect(), ..labels.clone() };
        write_labels(&p, &wide).expect("write u16 labels");
        assert_eq!(read_labels(&p).expect("read u16 labels"), wide);
    }
}

fn nifti_bytes(
    dims: [u16; 3],
    datatype: i16,
    bitpix: i16,
    voxels: &[u8],
    big_endian: bool,
) -> Vec<u8> {
    let mut h = vec![0u8; 352];
    let put_i32 = |h: &mut Vec<u8>, at: usize, v: i32| {
        h[at..at + 4].copy_from_slice(&if big_endian { v.to_be_bytes() } else { v.to_le_bytes() })
    };
    let put_i16 = |h: &mut Vec<u8>, at: usize, v: i16| {
        h[at..at + 2].copy_from_slice(&if big_endian { v.to_be_bytes() } else { v.to_le_bytes() })
    };
    let put_f32 = |h: &mut Vec<u8>, at: usize, v: f32| {
        h[at..at + 4].copy_from_slice(&if big_endian { v.to_be_bytes() } else { v.to_le_bytes() })
    };
    put_i32(&mut h, 0, 348);
    put_i16(&mut h, 40, 3);
    for (i, d) in dims.iter().enumerate() {
        put_i16(&mut h, 42 + 2 * i, *d as i16);
    }
    for i in 3..7 {
        put_i16(&mut h, 42 + 2 * i, 1);
    }
    put_i16(&mut h, 70, datatype);
    put_i16(&mut h, 72, bitpix);
    for i in 0..4 {
        put_f32(&mut h, 76 + 4 * i, 1.0);
    }
    put_f32(&mut h, 108, 352.0); // vox_offset
    put_f32(&mut h, 112, 2.0); // scl_slope
    put_f32(&mut h, 116, -5.0); // scl_inter
    h[344..348].copy_from_slice(b"n+1\0");
    h.extend_from_slice(voxels);
    h
}

#[test]
fn applies_slope_and_intercept_in_either_byte_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    for big in [false, true] {
        let vals: [f32; 4] = [1.5, -2.0, 100.0, 0.25];
        let bytes: Vec<u8> =
            vals.iter().flat_map(|v| if big { v.to_be_bytes() } else { v.to_le_bytes() }).collect();
        let p = dir.path().join(format!("f32_{big}.nii"));
        std::fs::write(&p, nifti_bytes([2, 2, 1], 16, 32, &bytes, big)).expect("write");
        let v = read_image(&p).expect("float32 reads");
        // No sform or qform: nibabel's Analyze affine (LAS), so reading as LPS swaps the rows.
        let scaled: Vec<f32> = vals.iter().map(|x| x * 2.0 - 5.0).collect();
        assert_eq!(v.data, [&scaled[2..], &scaled[..2]].concat());
    }
}

#[test]
fn refuses_nifti2_truncation_and_bad_labels_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    // NIfTI-2: header size 540.
    let mut n2 = vec![0u8; 600];
    n2[0..4].copy_from_slice(&540i32.to_le_bytes());
    let p = dir.path().join("two.nii");
    std::fs::write(&p, &n2).expect("write");
    let e = read_image(&p).expect_err("NIfTI-2 refused").to_string();
    assert!(e.contains("NIfTI-2") && e.contains("two.nii"), "{e}");
    // Header promises 2x2x2 uint8 but only 4 bytes follow.
    let p = dir.path().join("short.nii");
    std::fs::write(&p, nifti_bytes([2, 2, 2], 2, 8, &[1, 2, 3, 4], false)).expect("write");
    let e = read_image(&p).expect_err("truncated refused").to_string();
    assert!(e.contains("truncated") && e.contains("short.nii"), "{e}");
    // A damaged gzip stream.
    let img = sample_volume();
    let p = dir.path().join("cut.nii.gz");
    write_image(&p, &img).expect("write");
    let bytes = std::fs::read(&p).expect("read");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).expect("truncate");
    let e = read_image(&p).expect_err("cut gzip refused").to_string();
    assert!(e.contains("cut.nii.gz") && (e.contains("gzip") || e.contains("truncated")), "{e}");
    // Labels with a fractional value: slope 2, inter -5 on uint8 3 -> 1.0 fine; use float data.
    let p = dir.path().join("frac.nii");
    let bytes: Vec<u8> = [1.0f32, 2.25, 3.0, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&p, nifti_bytes([2, 2, 1], 16, 32, &bytes, false)).expect("write");
    let e = read_labels(&p).expect_err("non-integral label refused").to_string();
    assert!(e.contains("not an integer label"), "{e}");
    // Not NIfTI at all.
    let p = dir.path().join("junk.nii");
    let mut f = std::fs::File::create(&p).expect("create");
    f.write_all(&[7u8; 400]).expect("write");
    assert!(read_image(&p).is_err());
}
