//! Orientation: one case stored LPS, RAS, with its rows flipped, and with x and y swapped
//! gives the same predictions and the same Dice; an image and label on different grids are
//! refused; a prediction is written back on its image's own grid and header.

use std::path::Path;

use site_agent::data::{
    Affine, Manifest, ManifestCase, Orientation, Split, Volume, phantom, read_image_with_source,
    read_labels, write_image, write_labels, write_labels_like,
};
use site_agent::evaluate::{evaluate, predict};
use site_agent::train::{SliceSet, TrainOptions, train};

/// `v` (canonical) stored with the given permutation and flips: its data reordered and the
/// affine that puts every voxel back where it was.
fn stored_as<T: Copy + Default>(v: &Volume<T>, axis: [usize; 3], flip: [bool; 3]) -> Volume<T> {
    let mut stored_dims = [0; 3];
    for a in 0..3 {
        stored_dims[axis[a]] = v.dims[a];
    }
    let o = Orientation { stored_dims, axis, flip };
    let origin: [f64; 3] =
        std::array::from_fn(|a| if flip[a] { (v.dims[a] - 1) as f64 } else { 0.0 });
    let t = v.affine.apply(origin);
    let mut m = [[0.0; 4]; 3];
    for (r, row) in m.iter_mut().enumerate() {
        for a in 0..3 {
            row[axis[a]] = if flip[a] { -v.affine.0[r][a] } else { v.affine.0[r][a] };
        }
        row[3] = t[r];
    }
    Volume { dims: stored_dims, data: o.to_stored(&v.data), affine: Affine(m) }
}

const LAYOUTS: [(&str, [usize; 3], [bool; 3]); 4] = [
    ("lps", [0, 1, 2], [false, false, false]),
    ("ras", [0, 1, 2], [true, true, false]),
    ("rows-flipped", [0, 1, 2], [false, true, false]),
    ("x-y-swapped", [1, 0, 2], [false, false, false]),
];

fn write_case_as(dir: &Path, name: &str, image: &Volume<f32>, labels: &Volume<u16>) -> Manifest {
    let (axis, flip) = LAYOUTS.iter().find(|l| l.0 == name).map(|l| (l.1, l.2)).expect("layout");
    let (ip, lp) =
        (dir.join(format!("{name}-image.nii.gz")), dir.join(format!("{name}-label.nii.gz")));
    write_image(&ip, &stored_as(image, axis, flip)).expect("image");
    write_labels(&lp, &stored_as(labels, axis, flip)).expect("labels");
    Manifest {
        path: dir.join(format!("{name}.toml")),
        organs: phantom::organ_map(),
        cases: vec![ManifestCase { id: name.into(), image: ip, label: lp, split: Split::Test }],
    }
}

#[test]
fn mirrored_and_permuted_copies_of_a_case_score_the_same() {
    let (_d, m) = crate::center(phantom::Center::TargetA, 4, 1, 21);
    let net = crate::tiny(2);
    let data = m.load_split(Split::Train).expect("train");
    let slices = SliceSet::from_dataset(&data, &net).expect("slices");
    train(
        &net,
        net.num_layers(),
        &slices,
        &TrainOptions { epochs: 15, batch_size: 8, ..Default::default() },
        &mut |_| {},
    )
    .expect("train");
    let test = m.load_split(Split::Test).expect("test");
    let (image, labels) = (&test.cases[0].image, &test.cases[0].labels);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut runs = Vec::new();
    for (name, _, _) in LAYOUTS {
        let manifest = write_case_as(dir.path(), name, image, labels);
        let case = manifest.load_split(Split::Test).expect("loads in any layout");
        assert_eq!(case.cases[0].image.dims, image.dims, "{name}: canonical dims");
        assert_eq!(case.cases[0].image.data, image.data, "{name}: canonical voxels");
        let scores = evaluate(&net, &case).expect("evaluate");
        let pred = predict(&net, &case.cases[0].image).expect("predict");
        // Written back in the file's own layout and header, read again: the same prediction.
        let (_, source) = read_image_with_source(&manifest.cases[0].image).expect("source");
        let out = dir.path().join(format!("{name}-pred.nii.gz"));
        write_labels_like(&out, &pred, &source).expect("write back");
        assert_eq!(read_labels(&out).expect("reads").data, pred.data, "{name}: round trip");
        let header = |p: &Path| {
            let obj = nifti::ReaderOptions::new().read_file(p).expect("nifti");
            let h = nifti::NiftiObject::header(&obj).clone();
            (
                h.dim,
                h.srow_x,
                h.srow_y,
                h.srow_z,
                h.sform_code,
                h.qform_code,
                h.quatern_b,
                h.quatern_d,
            )
        };
        assert_eq!(header(&out), header(&manifest.cases[0].image), "{name}: the input's header");
        runs.push((name, pred, scores));
    }
    let (_, pred0, scores0) = &runs[0];
    let organs_found = scores0[0].scores.iter().filter(|s| s.dice > 0.1).count();
    eprintln!("organs found with Dice > 0.1: {organs_found}");
    assert!(
        organs_found >= 3,
        "the model finds organs ({organs_found}), so equality means something"
    );
    for (name, pred, scores) in &runs[1..] {
        assert_eq!(&pred.data, &pred0.data, "{name}: same prediction");
        for (a, b) in scores[0].scores.iter().zip(&scores0[0].scores) {
            assert_eq!(a.dice, b.dice, "{name}: label {} Dice", a.label);
        }
    }
}

#[test]
fn an_image_and_label_on_different_grids_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = Volume::new([6, 5, 4], [1.0, 1.0, 2.0], vec![0f32; 120]);
    let labels = image.with_data(vec![0u16; 120]);
    // The same grid stored in another voxel order is accepted.
    let m = write_case_as(dir.path(), "ras", &image, &labels);
    let mut case = m.cases[0].clone();
    case.image = dir.path().join("lps-image.nii.gz");
    write_image(&case.image, &image).expect("image");
    site_agent::data::check_case(&case, &m.organs).expect("same world grid in another order");
    // A label shifted by one voxel, or with another voxel size, is not.
    let mut shifted = labels.clone();
    shifted.affine.0[0][3] += 1.0;
    write_labels(&case.label, &shifted).expect("label");
    let e = site_agent::data::check_case(&case, &m.organs).expect_err("shifted").to_string();
    assert!(e.contains("1.000 voxels away") && e.contains("\"ras\""), "{e}");
    let mut larger = labels.clone();
    larger.affine.0[2][2] = 2.2;
    write_labels(&case.label, &larger).expect("label");
    let e = site_agent::data::check_case(&case, &m.organs).expect_err("spacing").to_string();
    assert!(e.contains("0.600 voxels away"), "{e}");
}
