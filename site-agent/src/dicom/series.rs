//! A CT series: its slices ordered by position, its geometry, and its voxels in HU.
//!
//! Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product
//! of ImageOrientationPatient's row and column directions), never by InstanceNumber, which
//! scanners number in either direction. The stored voxel order is the DICOM one: `i` along a
//! row (column index), `j` down the rows, `k` by increasing position along the normal.
//! Coordinates here are DICOM patient coordinates (LPS mm); [`CtSeries::affine`] converts to
//! the RAS+ affine every NIfTI volume carries.

use std::path::{Path, PathBuf};

use crate::data::{Affine, Image, Volume};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};

use super::{DicomError, DicomResult, cross, dot, number, numbers, open, sub, text};

/// Directions agree when their cosines differ by less than this.
const DIRECTION_TOLERANCE: f64 = 1e-4;
/// Slices are equally spaced when every gap is within this share of the median gap.
const SPACING_TOLERANCE: f64 = 0.01;

/// One slice of a series, as found on disk.
#[derive(Clone, Debug)]
pub struct CtSlice {
    pub path: PathBuf,
    pub sop_instance_uid: String,
    /// ImagePositionPatient (LPS mm).
    pub position: [f64; 3],
    pub instance_number: Option<i64>,
}

/// What the RTSTRUCT writer copies from the CT so that the planning system files the new
/// structure set with its patient and study. Stays at the site.
#[derive(Clone, Debug, Default)]
pub struct PatientStudy {
    /// (tag, VR, value) of the patient and study attributes present in the CT.
    pub attributes: Vec<(dicom_core::Tag, dicom_core::VR, String)>,
}

/// A CT series read from one folder (or from files grouped by SeriesInstanceUID).
#[derive(Clone, Debug)]
pub struct CtSeries {
    /// The folder the series was read from (for messages).
    pub dir: PathBuf,
    pub series_uid: String,
    pub study_uid: String,
    pub frame_of_reference_uid: Option<String>,
    pub patient_id: Option<String>,
    pub patient_name: Option<String>,
    pub sop_class_uid: String,
    /// Ordered by position along `normal`.
    pub slices: Vec<CtSlice>,
    pub rows: usize,
    pub columns: usize,
    /// Direction in which the column index increases (IOP's first triplet).
    pub row_dir: [f64; 3],
    /// Direction in which the row index increases (IOP's second triplet).
    pub col_dir: [f64; 3],
    pub normal: [f64; 3],
    /// PixelSpacing: [between rows, between columns] (mm).
    pub pixel_spacing: [f64; 2],
    /// Distance between slice centres along `normal` (mm).
    pub slice_spacing: f64,
    pub patient_study: PatientStudy,
}

/// The header facts of one CT file, read before its pixels.
#[derive(Clone, Debug)]
pub struct CtHeader {
    pub path: PathBuf,
    pub series_uid: String,
    pub study_uid: String,
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub frame_of_reference_uid: Option<String>,
    pub orientation: [f64; 6],
    pub position: [f64; 3],
    pub pixel_spacing: [f64; 2],
    pub rows: usize,
    pub columns: usize,
    pub instance_number: Option<i64>,
    pub slice_thickness: Option<f64>,
    pub frames: usize,
}

impl CtHeader {
    /// Reads the attributes of a CT image object; `None` for an object that is not a CT image.
    pub fn from_object(path: &Path, obj: &InMemDicomObject) -> DicomResult<Option<Self>> {
        let modality = text(obj, tags::MODALITY);
        let sop_class = text(obj, tags::SOP_CLASS_UID).unwrap_or_default();
        if modality.as_deref() != Some("CT") && sop_class != super::CT_IMAGE_STORAGE {
            return Ok(None);
        }
        let fail = |reason: String| DicomError::File { path: path.into(), reason };
        let need = |tag, what: &str| {
            text(obj, tag).ok_or_else(|| fail(format!("the CT slice has no {what}")))
        };
        let triple = |tag, what: &str, n: usize| -> DicomResult<Vec<f64>> {
            let v = numbers(obj, tag).ok_or_else(|| fail(format!("the CT slice has no {what}")))?;
            if v.len() != n || v.iter().any(|x| !x.is_finite()) {
                return Err(fail(format!(
                    "{what} has {} values {v:?}; it needs {n} numbers",
                    v.len()
                )));
            }
            Ok(v)
        };
        let iop = triple(tags::IMAGE_ORIENTATION_PATIENT, "ImageOrientationPatient", 6)?;
        let ipp = triple(tags::IMAGE_POSITION_PATIENT, "ImagePositionPatient", 3)?;
        let ps = triple(tags::PIXEL_SPACING, "PixelSpacing", 2)?;
        if ps.iter().any(|&s| s <= 0.0) {
            return Err(fail(format!("PixelSpacing {ps:?} is not positive")));
        }
        let dim = |tag, what: &str| -> DicomResult<usize> {
            let v = obj
                .get(tag)
                .and_then(|e| e.to_int::<u32>().ok())
                .ok_or_else(|| fail(format!("the CT slice has no {what}")))?;
            if v == 0 {
                return Err(fail(format!("{what} is 0: the slice holds no image")));
            }
            Ok(v as usize)
        };
        Ok(Some(Self {
            path: path.into(),
            series_uid: need(tags::SERIES_INSTANCE_UID, "SeriesInstanceUID")?,
            study_uid: need(tags::STUDY_INSTANCE_UID, "StudyInstanceUID")?,
            sop_instance_uid: need(tags::SOP_INSTANCE_UID, "SOPInstanceUID")?,
            sop_class_uid: if sop_class.is_empty() {
                super::CT_IMAGE_STORAGE.into()
            } else {
                sop_class
            },
            frame_of_reference_uid: text(obj, tags::FRAME_OF_REFERENCE_UID),
            orientation: std::array::from_fn(|i| iop[i]),
            position: std::array::from_fn(|i| ipp[i]),
            pixel_spacing: [ps[0], ps[1]],
            rows: dim(tags::ROWS, "Rows")?,
            columns: dim(tags::COLUMNS, "Columns")?,
            instance_number: obj.get(tags::INSTANCE_NUMBER).and_then(|e| e.to_int::<i64>().ok()),
            slice_thickness: number(obj, tags::SLICE_THICKNESS),
            frames: obj
                .get(tags::NUMBER_OF_FRAMES)
                .and_then(|e| e.to_int::<u32>().ok())
                .map_or(1, |n| n as usize),
        }))
    }
}

/// Patient and study attributes an RTSTRUCT repeats from its CT.
const PATIENT_STUDY_TAGS: [dicom_core::Tag; 11] = [
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::STUDY_INSTANCE_UID,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::STUDY_ID,
    tags::STUDY_DESCRIPTION,
    tags::ACCESSION_NUMBER,
    tags::REFERRING_PHYSICIAN_NAME,
];

impl CtSeries {
    /// Orders and checks the slices of one series. `headers` all share a SeriesInstanceUID.
    pub fn from_headers(dir: &Path, mut headers: Vec<CtHeader>) -> DicomResult<Self> {
        let fail = |reason: String| DicomError::Series { dir: dir.into(), reason };
        let Some(first) = headers.first().cloned() else {
            return Err(fail("holds no CT slice; point at the folder of one CT series".into()));
        };
        if let Some(multi) = headers.iter().find(|h| h.frames > 1) {
            return Err(fail(format!(
                "{} is a multi-frame (enhanced) CT with {} frames; export the series as one \
                 file per slice (classic CT Image Storage)",
                multi.path.display(),
                multi.frames
            )));
        }
        for h in &headers {
            if h.series_uid != first.series_uid {
                return Err(fail(format!(
                    "holds more than one CT series ({} and {}); give each series its own folder \
                     or use --root",
                    first.series_uid, h.series_uid
                )));
            }
            let differs = h
                .orientation
                .iter()
                .zip(&first.orientation)
                .any(|(a, b)| (a - b).abs() > DIRECTION_TOLERANCE);
            if differs {
                return Err(fail(format!(
                    "mixed slice orientations: {} has ImageOrientationPatient {:?} but {} has \
                     {:?}; a volume needs one orientation (was a localizer or a reformat \
                     exported with the series?)",
                    first.path.display(),
                    first.orientation,
                    h.path.display(),
                    h.orientation
                )));
            }
            if (h.rows, h.columns) != (first.rows, first.columns)
                || (h.pixel_spacing[0] - first.pixel_spacing[0]).abs() > 1e-6
                || (h.pixel_spacing[1] - first.pixel_spacing[1]).abs() > 1e-6
            {
                return Err(fail(format!(
                    "slices differ in size or pixel spacing: {} is {}x{} at {:?} mm, {} is \
                     {}x{} at {:?} mm",
                    first.path.display(),
                    first.rows,
                    first.columns,
                    first.pixel_spacing,
                    h.path.display(),
                    h.rows,
                    h.columns,
                    h.pixel_spacing
                )));
            }
        }
        let o = first.orientation;
        let (row_dir, col_dir) = ([o[0], o[1], o[2]], [o[3], o[4], o[5]]);
        let normal = cross(row_dir, col_dir);
        let n_len = dot(normal, normal).sqrt();
        if !(0.99..=1.01).contains(&n_len) || dot(row_dir, col_dir).abs() > 1e-3 {
            return Err(fail(format!(
                "ImageOrientationPatient {o:?} is not two orthogonal unit directions"
            )));
        }
        let normal = normal.map(|v| v / n_len);
        headers.sort_by(|a, b| dot(a.position, normal).total_cmp(&dot(b.position, normal)));
        let heights: Vec<f64> = headers.iter().map(|h| dot(h.position, normal)).collect();
        for (w, pair) in headers.windows(2).enumerate() {
            if (heights[w + 1] - heights[w]).abs() < 1e-3 {
                return Err(fail(format!(
                    "two slices at the same position {:.3} mm along the slice normal: {} \
                     (instance {:?}) and {} (instance {:?}); remove the duplicate (a second \
                     reconstruction exported into the same folder?)",
                    heights[w],
                    pair[0].path.display(),
                    pair[0].instance_number,
                    pair[1].path.display(),
                    pair[1].instance_number
                )));
            }
        }
        let slice_spacing = if headers.len() > 1 {
            let gaps: Vec<f64> = heights.windows(2).map(|w| w[1] - w[0]).collect();
            let mut sorted = gaps.clone();
            sorted.sort_by(f64::total_cmp);
            let median = sorted[sorted.len() / 2];
            if let Some((w, gap)) = gaps
                .iter()
                .enumerate()
                .find(|(_, g)| (**g - median).abs() > SPACING_TOLERANCE * median)
            {
                return Err(fail(format!(
                    "irregular slice spacing: {gap:.3} mm between the slices at {:.3} and \
                     {:.3} mm ({} and {}) where the series steps {median:.3} mm; a slice is \
                     missing or the series mixes reconstructions; export the complete series",
                    heights[w],
                    heights[w + 1],
                    headers[w].path.display(),
                    headers[w + 1].path.display()
                )));
            }
            // Gantry tilt: successive positions step off the normal.
            let step = sub(headers[1].position, headers[0].position);
            let along = dot(step, normal);
            let off = sub(step, normal.map(|v| v * along));
            let off = dot(off, off).sqrt();
            if off > 0.01 * along.abs().max(1e-6) {
                let degrees = off.atan2(along.abs()).to_degrees();
                return Err(fail(format!(
                    "gantry tilt of {degrees:.1} degrees: slice positions step {off:.2} mm \
                     sideways per slice; resample the series to an untilted grid (for example \
                     with 3D Slicer or dcm2niix) before importing"
                )));
            }
            (heights[heights.len() - 1] - heights[0]) / (heights.len() - 1) as f64
        } else {
            first.slice_thickness.filter(|t| *t > 0.0).ok_or_else(|| {
                fail(format!(
                    "a single slice ({}) without SliceThickness: its thickness is unknown",
                    first.path.display()
                ))
            })?
        };
        Ok(Self {
            dir: dir.into(),
            series_uid: first.series_uid.clone(),
            study_uid: first.study_uid.clone(),
            frame_of_reference_uid: first.frame_of_reference_uid.clone(),
            patient_id: None,
            patient_name: None,
            sop_class_uid: first.sop_class_uid.clone(),
            slices: headers
                .iter()
                .map(|h| CtSlice {
                    path: h.path.clone(),
                    sop_instance_uid: h.sop_instance_uid.clone(),
                    position: h.position,
                    instance_number: h.instance_number,
                })
                .collect(),
            rows: first.rows,
            columns: first.columns,
            row_dir,
            col_dir,
            normal,
            pixel_spacing: first.pixel_spacing,
            slice_spacing,
            patient_study: PatientStudy::default(),
        })
    }

    /// Reads every CT file directly in `dir` (other files are skipped) as one series.
    pub fn read_dir(dir: &Path) -> DicomResult<Self> {
        let entries =
            std::fs::read_dir(dir).map_err(|source| DicomError::Io { path: dir.into(), source })?;
        let mut headers = Vec::new();
        for entry in entries {
            let path = entry.map_err(|source| DicomError::Io { path: dir.into(), source })?.path();
            if !path.is_file() {
                continue;
            }
            let Ok(obj) = super::open_header(&path) else { continue };
            if let Some(h) = CtHeader::from_object(&path, &obj)? {
                headers.push(h);
            }
        }
        Self::from_headers(dir, headers)
    }

    /// Stored voxel index -> DICOM patient position (LPS mm).
    pub fn to_patient(&self, v: [f64; 3]) -> [f64; 3] {
        let o = self.slices[0].position;
        let [sr, sc] = self.pixel_spacing;
        std::array::from_fn(|a| {
            o[a] + v[0] * sc * self.row_dir[a]
                + v[1] * sr * self.col_dir[a]
                + v[2] * self.slice_spacing * self.normal[a]
        })
    }

    /// Height of (fractional) slice `k` along the slice normal (mm).
    pub fn height(&self, k: f64) -> f64 {
        dot(self.slices[0].position, self.normal) + k * self.slice_spacing
    }

    /// DICOM patient position (LPS mm) -> stored voxel index (fractional).
    pub fn to_voxel(&self, p: [f64; 3]) -> [f64; 3] {
        let d = sub(p, self.slices[0].position);
        let [sr, sc] = self.pixel_spacing;
        [
            dot(d, self.row_dir) / sc,
            dot(d, self.col_dir) / sr,
            dot(d, self.normal) / self.slice_spacing,
        ]
    }

    /// The stored grid's voxel-to-world affine (RAS+ mm, as NIfTI).
    pub fn affine(&self) -> Affine {
        let o = self.to_patient([0.0; 3]);
        let cols = [
            sub(self.to_patient([1.0, 0.0, 0.0]), o),
            sub(self.to_patient([0.0, 1.0, 0.0]), o),
            sub(self.to_patient([0.0, 0.0, 1.0]), o),
        ];
        // LPS -> RAS: negate x and y.
        let sign = [-1.0, -1.0, 1.0];
        Affine(std::array::from_fn(|r| {
            [sign[r] * cols[0][r], sign[r] * cols[1][r], sign[r] * cols[2][r], sign[r] * o[r]]
        }))
    }

    /// Stored dims: columns, rows, slices.
    pub fn dims(&self) -> [usize; 3] {
        [self.columns, self.rows, self.slices.len()]
    }

    /// Decodes every slice to HU (RescaleSlope and RescaleIntercept applied) in stored order,
    /// and keeps the patient and study attributes for an RTSTRUCT.
    pub fn read_image(&mut self) -> DicomResult<Image> {
        let plane = self.rows * self.columns;
        let mut data = Vec::with_capacity(plane * self.slices.len());
        for (k, slice) in self.slices.iter().enumerate() {
            let obj = open(&slice.path)?;
            let fail = |reason: String| DicomError::File { path: slice.path.clone(), reason };
            if k == 0 {
                self.patient_id = text(&obj, tags::PATIENT_ID);
                self.patient_name = text(&obj, tags::PATIENT_NAME);
                self.patient_study = PatientStudy {
                    attributes: PATIENT_STUDY_TAGS
                        .iter()
                        .filter_map(|&t| {
                            let e = obj.get(t)?;
                            Some((t, e.vr(), e.to_str().ok()?.trim().to_owned()))
                        })
                        .collect(),
                };
            }
            let ts = obj.meta().transfer_syntax().trim_end_matches('\0').to_owned();
            let decoded = obj.decode_pixel_data().map_err(|e| {
                fail(format!(
                    "its pixel data (transfer syntax {ts}) cannot be decoded: {e}; export the \
                     series uncompressed (Explicit VR Little Endian) from the planning system, \
                     or decompress it (for example gdcmconv --raw or dcmdjpeg)"
                ))
            })?;
            if decoded.samples_per_pixel() != 1 || decoded.number_of_frames() != 1 {
                return Err(fail(format!(
                    "{} samples per pixel and {} frames; a CT slice has one of each",
                    decoded.samples_per_pixel(),
                    decoded.number_of_frames()
                )));
            }
            let raw: Vec<f64> = decoded
                .to_vec_with_options(
                    &ConvertOptions::new().with_modality_lut(ModalityLutOption::None),
                )
                .map_err(|e| fail(format!("its pixel values cannot be read: {e}")))?;
            if raw.len() != plane {
                return Err(fail(format!("{} pixels where Rows x Columns is {plane}", raw.len())));
            }
            let slope = number(&obj, tags::RESCALE_SLOPE).unwrap_or(1.0);
            let intercept = number(&obj, tags::RESCALE_INTERCEPT).unwrap_or(0.0);
            if !(slope.is_finite() && intercept.is_finite()) || slope == 0.0 {
                return Err(fail(format!(
                    "RescaleSlope {slope} / RescaleIntercept {intercept} are not usable"
                )));
            }
            data.extend(raw.iter().map(|&v| (v * slope + intercept) as f32));
        }
        Ok(Volume { dims: self.dims(), data, affine: self.affine() })
    }
}
