//! An RT structure set: its ROIs, which CT it was drawn on, and each ROI rasterised onto that
//! CT's grid.
//!
//! Only CLOSED_PLANAR contours describe a region. Each is matched to the CT slice whose plane it
//! lies in (within a quarter of the slice spacing, as its points' mean height along the slice
//! normal) and filled at pixel centres with the even-odd rule, all contours of an ROI on one
//! slice together, so a contour inside another is a hole. POINT and OPEN_PLANAR contours,
//! contours off every slice plane or not planar, and ROIs with no contour are listed with the
//! reason and skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::contours::fill_even_odd;
use super::series::CtSeries;
use super::{DicomError, DicomResult, items, numbers, text};

/// A contour's plane matches a slice within this share of the slice spacing.
const PLANE_TOLERANCE: f64 = 0.25;

/// One contour as stored: its type and points (LPS mm).
#[derive(Clone, Debug)]
pub struct Contour {
    pub geometric_type: String,
    pub points: Vec<[f64; 3]>,
}

/// One ROI of the structure set.
#[derive(Clone, Debug)]
pub struct Roi {
    pub number: i64,
    pub name: String,
    pub contours: Vec<Contour>,
}

/// A parsed RT structure set.
#[derive(Clone, Debug)]
pub struct RtStruct {
    pub path: PathBuf,
    pub sop_instance_uid: Option<String>,
    /// ReferencedFrameOfReferenceSequence's frames of reference.
    pub frames_of_reference: Vec<String>,
    /// RTReferencedSeriesSequence's series.
    pub referenced_series: Vec<String>,
    /// StructureSetDate and StructureSetTime, for choosing the newest of several.
    pub date_time: String,
    pub rois: Vec<Roi>,
}

impl RtStruct {
    pub fn read(path: &Path) -> DicomResult<Self> {
        let obj = super::open(path)?;
        Self::from_object(path, &obj)
    }

    pub fn from_object(path: &Path, obj: &InMemDicomObject) -> DicomResult<Self> {
        let fail = |reason: String| DicomError::RtStruct { path: path.into(), reason };
        let class = text(obj, tags::SOP_CLASS_UID).unwrap_or_default();
        let modality = text(obj, tags::MODALITY).unwrap_or_default();
        if class != super::RT_STRUCTURE_SET_STORAGE && modality != "RTSTRUCT" {
            return Err(fail(format!(
                "is not an RT structure set (SOP class {class:?}, modality {modality:?}); give \
                 the RTSTRUCT file exported with the CT"
            )));
        }
        let mut names = BTreeMap::new();
        for item in items(obj, tags::STRUCTURE_SET_ROI_SEQUENCE) {
            if let Some(n) = item.get(tags::ROI_NUMBER).and_then(|e| e.to_int::<i64>().ok()) {
                names.insert(n, text(item, tags::ROI_NAME).unwrap_or_else(|| format!("ROI {n}")));
            }
        }
        let mut rois: BTreeMap<i64, Roi> = names
            .iter()
            .map(|(&number, name)| {
                (number, Roi { number, name: name.clone(), contours: Vec::new() })
            })
            .collect();
        for item in items(obj, tags::ROI_CONTOUR_SEQUENCE) {
            let Some(n) =
                item.get(tags::REFERENCED_ROI_NUMBER).and_then(|e| e.to_int::<i64>().ok())
            else {
                continue;
            };
            let roi = rois.entry(n).or_insert_with(|| Roi {
                number: n,
                name: format!("ROI {n}"),
                contours: Vec::new(),
            });
            for c in items(item, tags::CONTOUR_SEQUENCE) {
                let data = numbers(c, tags::CONTOUR_DATA).unwrap_or_default();
                if !data.len().is_multiple_of(3) || data.iter().any(|v| !v.is_finite()) {
                    return Err(fail(format!(
                        "ROI \"{}\" has a contour of {} numbers, not x, y, z triples",
                        roi.name,
                        data.len()
                    )));
                }
                roi.contours.push(Contour {
                    geometric_type: text(c, tags::CONTOUR_GEOMETRIC_TYPE).unwrap_or_default(),
                    points: data.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect(),
                });
            }
        }
        let mut frames = Vec::new();
        let mut series = Vec::new();
        for f in items(obj, tags::REFERENCED_FRAME_OF_REFERENCE_SEQUENCE) {
            frames.extend(text(f, tags::FRAME_OF_REFERENCE_UID));
            for study in items(f, tags::RT_REFERENCED_STUDY_SEQUENCE) {
                for s in items(study, tags::RT_REFERENCED_SERIES_SEQUENCE) {
                    series.extend(text(s, tags::SERIES_INSTANCE_UID));
                }
            }
        }
        Ok(Self {
            path: path.into(),
            sop_instance_uid: text(obj, tags::SOP_INSTANCE_UID),
            frames_of_reference: frames,
            referenced_series: series,
            date_time: format!(
                "{}{}",
                text(obj, tags::STRUCTURE_SET_DATE).unwrap_or_default(),
                text(obj, tags::STRUCTURE_SET_TIME).unwrap_or_default()
            ),
            rois: rois.into_values().collect(),
        })
    }

    /// Whether this structure set says it was drawn on `ct` (its series, else its frame of
    /// reference); `None` when it names neither.
    pub fn refers_to(&self, ct: &CtSeries) -> Option<bool> {
        if !self.referenced_series.is_empty() {
            return Some(self.referenced_series.contains(&ct.series_uid));
        }
        if !self.frames_of_reference.is_empty() {
            return Some(
                ct.frame_of_reference_uid
                    .as_ref()
                    .is_some_and(|f| self.frames_of_reference.contains(f)),
            );
        }
        None
    }

    /// Refuses a structure set drawn on another CT.
    pub fn check_refers_to(&self, ct: &CtSeries) -> DicomResult<()> {
        match self.refers_to(ct) {
            Some(true) => Ok(()),
            Some(false) => Err(DicomError::RtStruct {
                path: self.path.clone(),
                reason: format!(
                    "was drawn on another CT: it references series {:?} and frame of reference \
                     {:?}, but the CT in {} is series {} with frame of reference {}; give the \
                     RTSTRUCT exported with this CT",
                    self.referenced_series,
                    self.frames_of_reference,
                    ct.dir.display(),
                    ct.series_uid,
                    ct.frame_of_reference_uid.as_deref().unwrap_or("(none)")
                ),
            }),
            None => {
                tracing::warn!(
                    rtstruct = %self.path.display(),
                    "the RTSTRUCT names no series or frame of reference; its contours are placed by position alone"
                );
                Ok(())
            }
        }
    }
}

/// An ROI on the CT grid, with what was skipped and why.
#[derive(Clone, Debug)]
pub struct RasterRoi {
    pub name: String,
    /// Stored CT order (column fastest, then row, then slice).
    pub mask: Vec<bool>,
    pub voxels: usize,
    pub skipped: Vec<String>,
}

/// Fills `roi`'s closed planar contours on `ct`'s stored grid.
pub fn rasterize(roi: &Roi, ct: &CtSeries) -> RasterRoi {
    let [w, h, nz] = ct.dims();
    let mut per_slice: BTreeMap<usize, Vec<Vec<[f64; 2]>>> = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut off_heights = Vec::new();
    for c in &roi.contours {
        if c.geometric_type != "CLOSED_PLANAR" {
            skipped.push(format!(
                "a {} contour (only CLOSED_PLANAR outlines a region)",
                c.geometric_type
            ));
            continue;
        }
        if c.points.len() < 3 {
            skipped.push(format!("a closed contour of {} points", c.points.len()));
            continue;
        }
        let vox: Vec<[f64; 3]> = c.points.iter().map(|&p| ct.to_voxel(p)).collect();
        let k = vox.iter().map(|v| v[2]).sum::<f64>() / vox.len() as f64;
        if vox.iter().any(|v| (v[2] - k).abs() > PLANE_TOLERANCE) {
            skipped.push("a contour whose points do not lie in one slice plane".into());
            continue;
        }
        let slice = k.round();
        if (k - slice).abs() > PLANE_TOLERANCE || slice < 0.0 || slice >= nz as f64 {
            off_heights.push(ct.height(k));
            continue;
        }
        per_slice
            .entry(slice as usize)
            .or_default()
            .push(vox.iter().map(|v| [v[0], v[1]]).collect());
    }
    if !off_heights.is_empty() {
        let (lo, hi) =
            off_heights.iter().fold((f64::MAX, f64::MIN), |(a, b), &z| (a.min(z), b.max(z)));
        skipped.push(format!(
            "{} contours on planes that match no CT slice (heights {lo:.2} to {hi:.2} mm; \
             the CT covers {:.2} to {:.2} mm)",
            off_heights.len(),
            ct.height(0.0),
            ct.height((nz - 1) as f64)
        ));
    }
    let mut mask = vec![false; w * h * nz];
    for (k, polys) in per_slice {
        let plane = fill_even_odd(&polys, w, h);
        mask[k * w * h..(k + 1) * w * h].copy_from_slice(&plane);
    }
    let voxels = mask.iter().filter(|&&b| b).count();
    if roi.contours.is_empty() {
        skipped.push("the ROI has no contour".into());
    }
    RasterRoi { name: roi.name.clone(), mask, voxels, skipped }
}
