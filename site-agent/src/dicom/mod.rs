//! DICOM in and out: a CT series and its RTSTRUCT become a NIfTI image and label map
//! (`import-dicom`), and a predicted label map goes back to the planning system as an
//! RTSTRUCT that references the CT's slices (`predict --rtstruct-out`).
//!
//! # Layout
//! - [`series`]: reading a CT series: grouping, ordering slices by position, HU, the affine,
//!   and the refusals (mixed orientations, gantry tilt, duplicate or missing slices, pixel data
//!   that cannot be decoded).
//! - [`rtstruct`]: reading an RT structure set and rasterising its closed planar contours onto
//!   the CT grid (even-odd rule at pixel centres).
//! - [`contours`]: the plane geometry both directions share: polygon fill and boundary tracing.
//! - [`import`]: one case or a whole export folder to NIfTI files and a manifest.
//! - [`export`]: a label map to an RTSTRUCT.
//! - [`synthetic`]: CT series written from volumes (phantom exports, generated test series).
//!
//! # Invariants
//! Nothing read from a DICOM file is written under the import's output folder except voxels,
//! the affine and organ names; patient identifiers and UIDs go only into the local key file.
//! All DICOM parsing and pixel decoding is dicom-rs's; this module reads attributes.

pub mod contours;
pub mod export;
pub mod import;
pub mod rtstruct;
pub mod series;
pub mod synthetic;

use std::path::{Path, PathBuf};

use dicom_core::Tag;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};

/// SOP class of CT Image Storage.
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// SOP class of RT Structure Set Storage.
pub const RT_STRUCTURE_SET_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.481.3";

pub type DicomResult<T> = Result<T, DicomError>;

/// What can be wrong with DICOM input; each message names the file or series and says what
/// to do.
#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a readable DICOM file: {reason}")]
    NotDicom { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("CT series in {dir}: {reason}")]
    Series { dir: PathBuf, reason: String },
    #[error("RTSTRUCT {path}: {reason}")]
    RtStruct { path: PathBuf, reason: String },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error(transparent)]
    Names(#[from] shared::structures::NamesError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
}

/// Opens a DICOM file: a Part 10 file, or a bare data set in implicit VR little endian (what
/// some planning systems and older tools write, pydicom's `force=True` case).
pub fn open(path: &Path) -> DicomResult<DefaultDicomObject> {
    open_with(path, OpenFileOptions::new())
}

/// Opens a DICOM file without its pixel data (for scanning folders).
pub fn open_header(path: &Path) -> DicomResult<DefaultDicomObject> {
    open_with(path, OpenFileOptions::new().read_until(dicom_dictionary_std::tags::PIXEL_DATA))
}

fn open_with(path: &Path, options: OpenFileOptions) -> DicomResult<DefaultDicomObject> {
    match options.open_file(path) {
        Ok(obj) => Ok(obj),
        Err(part10) => {
            let bytes = std::fs::read(path)
                .map_err(|source| DicomError::Io { path: path.into(), source })?;
            bare_dataset(&bytes).ok_or_else(|| DicomError::NotDicom {
                path: path.into(),
                reason: part10.to_string(),
            })
        }
    }
}

/// A data set without preamble or file meta, read as implicit VR little endian, accepted only
/// when it starts at group 0008 (as every such file does) so that random bytes are refused.
fn bare_dataset(bytes: &[u8]) -> Option<DefaultDicomObject> {
    use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
    if bytes.len() < 8 || bytes[0..2] != [0x08, 0x00] {
        return None;
    }
    let obj =
        InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased()).ok()?;
    let class = text(&obj, dicom_dictionary_std::tags::SOP_CLASS_UID)?;
    let instance = text(&obj, dicom_dictionary_std::tags::SOP_INSTANCE_UID)?;
    let meta = dicom_object::meta::FileMetaTableBuilder::new()
        .transfer_syntax(IMPLICIT_VR_LITTLE_ENDIAN.uid())
        .media_storage_sop_class_uid(class)
        .media_storage_sop_instance_uid(instance);
    obj.with_meta(meta).ok()
}

/// A text attribute, trimmed of DICOM's padding; `None` when absent or empty.
pub fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let s = obj.get(tag)?.to_str().ok()?;
    let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!s.is_empty()).then(|| s.to_owned())
}

/// A multi-valued decimal attribute.
pub fn numbers(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    obj.get(tag)?.to_multi_float64().ok()
}

/// A single decimal attribute.
pub fn number(obj: &InMemDicomObject, tag: Tag) -> Option<f64> {
    obj.get(tag)?.to_float64().ok()
}

/// The items of a sequence attribute (empty when absent).
pub fn items(obj: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
    obj.get(tag).and_then(|e| e.items()).unwrap_or(&[])
}

/// A fresh UID under the UUID root (PS3.5 B.2: `2.25.` and a 128-bit random number).
pub fn new_uid() -> String {
    format!("2.25.{}", rand::random::<u128>())
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}
