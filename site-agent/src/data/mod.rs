//! Site data: volumes, NIfTI-1 files, the site manifest, validation and axial slicing.
//!
//! Volumes are kept with `x` varying fastest, then `y`, then `z` (axial slices are
//! contiguous), and carry their voxel-to-world [`Affine`]. Every volume the engine slices is
//! in the canonical LPS order of [`geometry`]; the readers return it so.

mod geometry;
mod manifest;
mod nifti_io;
pub mod phantom;
mod slices;

use std::path::PathBuf;

pub use geometry::{Affine, GRID_TOLERANCE_VOXELS, Orientation};
pub use manifest::{Case, Dataset, Manifest, ManifestCase, Split, check_case, load_case};
pub use nifti_io::{
    NiftiSource, read_image, read_image_with_source, read_labels, write_image, write_labels,
    write_labels_like,
};
pub use slices::{
    AxisMap, SliceSpec, Window, from_model, label_slices, resample_bilinear, resize_bilinear,
    resize_nearest, slice_stack, to_model,
};

/// A 3-D volume (x fastest) with its voxel-to-world affine.
#[derive(Clone, Debug, PartialEq)]
pub struct Volume<T> {
    pub dims: [usize; 3],
    pub data: Vec<T>,
    /// Voxel index -> RAS+ mm. Its column lengths are the voxel spacing.
    pub affine: Affine,
}

/// A CT image in Hounsfield units.
pub type Image = Volume<f32>;
/// A label map: 0 is background, other values name organs through an `OrganMap`.
pub type Labels = Volume<u16>;

impl<T: Copy> Volume<T> {
    /// A canonical (LPS) volume with `spacing` whose first voxel is at the world origin.
    pub fn new(dims: [usize; 3], spacing: [f32; 3], data: Vec<T>) -> Self {
        debug_assert_eq!(data.len(), dims[0] * dims[1] * dims[2]);
        Self { dims, data, affine: Affine::lps(spacing) }
    }

    /// A canonical volume filled with `value`.
    pub fn filled(dims: [usize; 3], spacing: [f32; 3], value: T) -> Self {
        Self::new(dims, spacing, vec![value; dims[0] * dims[1] * dims[2]])
    }

    /// Voxel size in mm along each axis.
    pub fn spacing(&self) -> [f32; 3] {
        self.affine.spacing()
    }

    /// The same volume reordered to canonical LPS (see [`geometry`]), and how it was reordered.
    pub fn to_canonical(&self) -> (Self, Orientation) {
        let o = Orientation::of(&self.affine, self.dims);
        let v = Self {
            dims: o.canonical_dims(),
            data: o.to_canonical(&self.data),
            affine: o.canonical_affine(&self.affine),
        };
        (v, o)
    }

    /// A volume of the same grid holding `data`.
    pub fn with_data<U>(&self, data: Vec<U>) -> Volume<U> {
        debug_assert_eq!(data.len(), self.data.len());
        Volume { dims: self.dims, data, affine: self.affine }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Voxels in one axial slice.
    pub fn slice_len(&self) -> usize {
        self.dims[0] * self.dims[1]
    }

    /// The axial slice `z`, row-major with `y` as rows and `x` as columns.
    pub fn slice(&self, z: usize) -> &[T] {
        let n = self.slice_len();
        &self.data[z * n..(z + 1) * n]
    }

    pub fn index(&self, x: usize, y: usize, z: usize) -> usize {
        x + self.dims[0] * (y + self.dims[1] * z)
    }
}

pub type DataResult<T> = Result<T, DataError>;

/// Everything that can be wrong with site data. Each message names the file (and the case,
/// where there is one) and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}; check that the file exists and is readable")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}; check that the folder exists and is writable")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Nifti { path: PathBuf, reason: String },
    #[error("manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("case \"{case}\" ({path}): {reason}")]
    Case { case: String, path: PathBuf, reason: String },
}

impl DataError {
    pub(crate) fn nifti(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Nifti { path: path.into(), reason: reason.into() }
    }

    /// A short, identifier-free reason code, the only thing about a data error that may leave
    /// the site.
    pub fn reason_code(&self) -> &'static str {
        match self {
            Self::Io { .. } => "unreadable_file",
            Self::Write { .. } => "unwritable_file",
            Self::Nifti { .. } => "invalid_nifti",
            Self::Manifest { .. } => "invalid_manifest",
            Self::Case { .. } => "invalid_case",
        }
    }
}
