//! The site manifest: the organ map and the list of cases, each an image, a label map and a split.
//!
//! ```toml
//! [organs]
//! 1 = "brainstem"
//! [[cases]]
//! id = "c001"                   # stays at the site, never sent anywhere
//! image = "images/c001.nii.gz"  # relative to the manifest
//! label = "labels/c001.nii.gz"
//! split = "train"               # or "test"
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{DataError, DataResult, GRID_TOLERANCE_VOXELS, Image, Labels, read_image, read_labels};
use shared::organs::OrganMap;

/// Which part of a site's data a case belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

/// One case as written in the manifest file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestCase {
    pub id: String,
    pub image: PathBuf,
    pub label: PathBuf,
    pub split: Split,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    organs: BTreeMap<String, String>,
    #[serde(default)]
    cases: Vec<ManifestCase>,
}

/// A parsed manifest, with case paths resolved against the manifest's folder.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub path: PathBuf,
    pub organs: OrganMap,
    pub cases: Vec<ManifestCase>,
}

/// A loaded, validated case. Its `id` never leaves the site.
#[derive(Clone, Debug)]
pub struct Case {
    pub id: String,
    pub image: Image,
    pub labels: Labels,
}

/// The loaded cases of one split, in manifest order (the order is the stable case index).
#[derive(Clone, Debug)]
pub struct Dataset {
    pub organs: OrganMap,
    pub cases: Vec<Case>,
}

impl Manifest {
    /// Reads and checks a manifest file (not the volumes it names; see [`Manifest::check`]).
    pub fn load(path: &Path) -> DataResult<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| DataError::Io { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses manifest text; `path` locates relative case paths and names the file in errors.
    pub fn parse(text: &str, path: &Path) -> DataResult<Self> {
        let err = |reason: String| DataError::Manifest { path: path.to_owned(), reason };
        let file: ManifestFile = toml::from_str(text).map_err(|e| err(format!("{e}")))?;
        let organs = OrganMap::from_string_keys(file.organs)
            .map_err(|e| err(format!("in [organs]: {e}")))?;
        if file.cases.is_empty() {
            return Err(err("no [[cases]]: list at least one case".to_owned()));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut seen = HashSet::new();
        let mut cases = Vec::with_capacity(file.cases.len());
        for mut case in file.cases {
            if case.id.trim().is_empty() {
                return Err(err("a case has an empty id; give every case a unique id".to_owned()));
            }
            if !seen.insert(case.id.clone()) {
                return Err(err(format!(
                    "case id \"{}\" appears twice; case ids must be unique",
                    case.id
                )));
            }
            case.image = base.join(&case.image);
            case.label = base.join(&case.label);
            cases.push(case);
        }
        Ok(Self { path: path.to_owned(), organs, cases })
    }

    /// Writes the manifest, with case paths made relative to `path`'s folder where possible.
    pub fn to_toml(&self) -> String {
        let base = self.path.parent().unwrap_or(Path::new("."));
        let file = ManifestFile {
            organs: self.organs.iter().map(|(k, v)| (k.to_string(), v.to_owned())).collect(),
            cases: self
                .cases
                .iter()
                .map(|c| ManifestCase {
                    id: c.id.clone(),
                    image: c.image.strip_prefix(base).unwrap_or(&c.image).to_owned(),
                    label: c.label.strip_prefix(base).unwrap_or(&c.label).to_owned(),
                    split: c.split,
                })
                .collect(),
        };
        // The organ keys are integers written as strings; TOML needs them quoted only if they
        // were not bare keys, and digits are valid bare keys.
        toml::to_string(&file).expect("manifest types always serialize")
    }

    pub fn cases_in(&self, split: Split) -> impl Iterator<Item = &ManifestCase> {
        self.cases.iter().filter(move |c| c.split == split)
    }

    /// Loads and validates every case of `split`, in manifest order.
    pub fn load_split(&self, split: Split) -> DataResult<Dataset> {
        let cases = self
            .cases_in(split)
            .map(|c| load_case(c, &self.organs))
            .collect::<DataResult<Vec<_>>>()?;
        if cases.is_empty() {
            return Err(DataError::Manifest {
                path: self.path.clone(),
                reason: format!(
                    "no case has split = \"{}\"; mark some cases for it",
                    if split == Split::Train { "train" } else { "test" }
                ),
            });
        }
        Ok(Dataset { organs: self.organs.clone(), cases })
    }

    /// Validates every case, returning all problems found (empty when the data is usable).
    pub fn check(&self) -> Vec<DataError> {
        self.cases.iter().filter_map(|c| check_case(c, &self.organs).err()).collect()
    }
}

/// Loads one case and checks it; errors name the case and the file.
pub fn load_case(case: &ManifestCase, organs: &OrganMap) -> DataResult<Case> {
    let in_case = |path: &Path, e: DataError| match e {
        DataError::Nifti { reason, .. } => {
            DataError::Case { case: case.id.clone(), path: path.to_owned(), reason }
        }
        DataError::Io { source, .. } => DataError::Case {
            case: case.id.clone(),
            path: path.to_owned(),
            reason: format!("cannot read the file ({source}); fix the path in the manifest"),
        },
        other => other,
    };
    let image = read_image(&case.image).map_err(|e| in_case(&case.image, e))?;
    let labels = read_labels(&case.label).map_err(|e| in_case(&case.label, e))?;
    let fail = |path: &Path, reason: String| DataError::Case {
        case: case.id.clone(),
        path: path.to_owned(),
        reason,
    };
    if image.dims != labels.dims {
        return Err(fail(
            &case.label,
            format!(
                "label shape {:?} differs from image shape {:?}; labels must be on the image's grid",
                labels.dims, image.dims
            ),
        ));
    }
    // Both are canonical now, so a label stored in another voxel order but on the same world
    // grid is accepted, and one on another grid (shifted, mirrored in its header) is not.
    let off = image.affine.grid_distance(&labels.affine, image.dims);
    if off > GRID_TOLERANCE_VOXELS {
        return Err(fail(
            &case.label,
            format!(
                "its affine puts voxels {off:.3} voxels away from where the image's affine puts \
                 them (image affine {:?}, label affine {:?}; tolerance {GRID_TOLERANCE_VOXELS} voxel): \
                 the label was not drawn on this image, or one header is wrong; re-export the \
                 label from the image it was drawn on",
                image.affine.0, labels.affine.0
            ),
        ));
    }
    for (axis, (&s, &d)) in image.spacing().iter().zip(&image.dims).enumerate() {
        if d > 1 && !(0.05..=50.0).contains(&s) {
            return Err(fail(
                &case.image,
                format!(
                    "voxel spacing {s} mm on axis {axis} is not plausible for CT (0.05 to 50 mm)"
                ),
            ));
        }
    }
    if let Some(i) = image.data.iter().position(|v| !v.is_finite()) {
        let (nx, ny) = (image.dims[0], image.dims[1]);
        return Err(fail(
            &case.image,
            format!(
                "voxel ({}, {}, {}) is {}; images must hold finite HU values",
                i % nx,
                (i / nx) % ny,
                i / (nx * ny),
                image.data[i]
            ),
        ));
    }
    let mut unknown: Vec<u16> =
        labels.data.iter().copied().filter(|&l| l != 0 && !organs.contains(l)).collect();
    if !unknown.is_empty() {
        unknown.sort_unstable();
        unknown.dedup();
        return Err(fail(
            &case.label,
            format!(
                "label values {unknown:?} are not in the manifest's [organs] map; add them or relabel"
            ),
        ));
    }
    Ok(Case { id: case.id.clone(), image, labels })
}

/// Validates one case without keeping its volumes.
pub fn check_case(case: &ManifestCase, organs: &OrganMap) -> DataResult<()> {
    load_case(case, organs).map(drop)
}

impl Dataset {
    /// Slices in this dataset.
    pub fn num_slices(&self) -> usize {
        self.cases.iter().map(|c| c.image.dims[2]).sum()
    }
}
