//! Writing CT series as DICOM: phantom cases as a planning-system export (`site-agent phantom
//! --dicom`), and the series the tests generate (shuffled, tilted, with gaps...).

use std::path::{Path, PathBuf};

use crate::data::{Image, Labels};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;
use shared::structures::standard_organ_map;

use super::series::CtSeries;
use super::{DicomError, DicomResult, new_uid};

/// Identity of a generated patient and series.
#[derive(Clone, Debug)]
pub struct SeriesIds {
    pub patient_id: String,
    pub patient_name: String,
    pub study_uid: String,
    pub series_uid: String,
    pub frame_of_reference_uid: String,
    /// What every UID of this series is derived from.
    seed: String,
}

/// A UID under the UUID root (`2.25.`) derived from `seed` and `what`: the same inputs give
/// the same UID, so a phantom export is reproducible from its seed.
fn derived_uid(seed: &str, what: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("{seed}/{what}"));
    let n = u128::from_be_bytes(d[..16].try_into().expect("16 bytes of a sha256"));
    format!("2.25.{n}")
}

impl SeriesIds {
    /// Fresh UIDs for a patient.
    pub fn new(patient_id: &str, patient_name: &str) -> Self {
        Self::seeded(patient_id, patient_name, &new_uid())
    }

    /// UIDs derived from `seed`.
    pub fn seeded(patient_id: &str, patient_name: &str, seed: &str) -> Self {
        Self {
            patient_id: patient_id.into(),
            patient_name: patient_name.into(),
            study_uid: derived_uid(seed, "study"),
            series_uid: derived_uid(seed, "series"),
            frame_of_reference_uid: derived_uid(seed, "frame of reference"),
            seed: seed.into(),
        }
    }

    /// The SOP instance UID of slice `k`.
    pub fn instance_uid(&self, k: usize) -> String {
        derived_uid(&self.seed, &format!("instance {k}"))
    }
}

/// One slice to write.
#[derive(Clone, Debug)]
pub struct SliceSpec<'a> {
    pub ids: &'a SeriesIds,
    pub sop_instance_uid: String,
    pub instance_number: i64,
    /// ImagePositionPatient (LPS mm).
    pub position: [f64; 3],
    /// ImageOrientationPatient.
    pub orientation: [f64; 6],
    /// PixelSpacing: [between rows, between columns].
    pub pixel_spacing: [f64; 2],
    pub slice_thickness: f64,
    pub rows: usize,
    pub columns: usize,
    /// HU, row by row; stored as int16 with RescaleIntercept -1024.
    pub hu: &'a [f32],
}

fn el(tag: dicom_core::Tag, vr: VR, v: impl Into<String>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(v.into()))
}

fn ds_list(v: &[f64]) -> PrimitiveValue {
    PrimitiveValue::Strs(v.iter().map(|x| format!("{x:.6}")).collect())
}

/// Writes one CT slice as a Part 10 file (explicit VR little endian).
pub fn write_slice(path: &Path, s: &SliceSpec<'_>) -> DicomResult<()> {
    let pixels: Vec<u16> =
        s.hu.iter().map(|&hu| ((hu + 1024.0).round().clamp(0.0, 65535.0)) as u16).collect();
    let obj = InMemDicomObject::from_element_iter([
        el(tags::SOP_CLASS_UID, VR::UI, super::CT_IMAGE_STORAGE),
        el(tags::SOP_INSTANCE_UID, VR::UI, &s.sop_instance_uid),
        el(tags::STUDY_DATE, VR::DA, "20260101"),
        el(tags::MODALITY, VR::CS, "CT"),
        el(tags::MANUFACTURER, VR::LO, "fedtune phantom"),
        el(tags::PATIENT_NAME, VR::PN, &s.ids.patient_name),
        el(tags::PATIENT_ID, VR::LO, &s.ids.patient_id),
        el(tags::SLICE_THICKNESS, VR::DS, format!("{:.4}", s.slice_thickness)),
        el(tags::STUDY_INSTANCE_UID, VR::UI, &s.ids.study_uid),
        el(tags::SERIES_INSTANCE_UID, VR::UI, &s.ids.series_uid),
        el(tags::SERIES_NUMBER, VR::IS, "1"),
        el(tags::INSTANCE_NUMBER, VR::IS, s.instance_number.to_string()),
        DataElement::new(tags::IMAGE_POSITION_PATIENT, VR::DS, ds_list(&s.position)),
        DataElement::new(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, ds_list(&s.orientation)),
        el(tags::FRAME_OF_REFERENCE_UID, VR::UI, &s.ids.frame_of_reference_uid),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
        el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(s.rows as u16)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(s.columns as u16)),
        DataElement::new(tags::PIXEL_SPACING, VR::DS, ds_list(&s.pixel_spacing)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(16u16)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(15u16)),
        DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0u16)),
        el(tags::RESCALE_INTERCEPT, VR::DS, "-1024"),
        el(tags::RESCALE_SLOPE, VR::DS, "1"),
        DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels.into())),
    ]);
    let file = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax("1.2.840.10008.1.2.1"))
        .map_err(|e| DicomError::Write { path: path.into(), reason: e.to_string() })?;
    file.write_to_file(path)
        .map_err(|e| DicomError::Write { path: path.into(), reason: e.to_string() })
}

/// Writes a canonical `image` as an axial head-first-supine CT series in `dir` (one file per
/// slice, instance numbers from the top down as many scanners number them).
pub fn write_series(image: &Image, ids: &SeriesIds, dir: &Path) -> DicomResult<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| DicomError::Write { path: dir.into(), reason: e.to_string() })?;
    let [nx, ny, nz] = image.dims;
    let lps = |v: [f64; 3]| {
        let p = image.affine.apply(v);
        [-p[0], -p[1], p[2]]
    };
    let o = lps([0.0; 3]);
    let dir_of = |v: [f64; 3]| {
        let d = [v[0] - o[0], v[1] - o[1], v[2] - o[2]];
        let n = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
        (d.map(|x| x / n), n)
    };
    let (row_dir, sx) = dir_of(lps([1.0, 0.0, 0.0]));
    let (col_dir, sy) = dir_of(lps([0.0, 1.0, 0.0]));
    let (_, sz) = dir_of(lps([0.0, 0.0, 1.0]));
    let mut paths = Vec::with_capacity(nz);
    for k in 0..nz {
        let path = dir.join(format!("CT{:04}.dcm", k + 1));
        write_slice(
            &path,
            &SliceSpec {
                ids,
                sop_instance_uid: ids.instance_uid(k),
                instance_number: (nz - k) as i64,
                position: lps([0.0, 0.0, k as f64]),
                orientation: [
                    row_dir[0], row_dir[1], row_dir[2], col_dir[0], col_dir[1], col_dir[2],
                ],
                pixel_spacing: [sy, sx],
                slice_thickness: sz,
                rows: ny,
                columns: nx,
                hu: image.slice(k),
            },
        )?;
        paths.push(path);
    }
    Ok(paths)
}

/// Writes a phantom case as a planning-system export: `dir/CT/` and `dir/RS.dcm` (the organs
/// under their TG-263 names).
pub fn write_case(image: &Image, labels: &Labels, ids: &SeriesIds, dir: &Path) -> DicomResult<()> {
    let ct_dir = dir.join("CT");
    write_series(image, ids, &ct_dir)?;
    let mut ct = CtSeries::read_dir(&ct_dir)?;
    // Read for the patient and study attributes the RTSTRUCT repeats. The series was written
    // in the canonical order of `labels`, so the label data is already in its stored order.
    let _ = ct.read_image()?;
    super::export::write_rtstruct(&ct, &labels.data, &standard_organ_map(), &dir.join("RS.dcm"))?;
    Ok(())
}
