//! A predicted label map as a DICOM RT structure set that a planning system files with its CT.
//!
//! The structure set repeats the CT's patient and study attributes, references the CT series
//! and every slice it contours by SOP instance, and names each organ by its TG-263 name with
//! one display colour per organ. Contours follow pixel edges (see `contours`), one or more
//! CLOSED_PLANAR contours per slice, holes as separate contours (even-odd), so importing the
//! file again gives back the same voxels.

use std::path::Path;

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;
use shared::organs::OrganMap;

use super::contours::trace_boundaries;
use super::series::CtSeries;
use super::{DicomError, DicomResult, new_uid};

/// Referenced SOP class of the study reference (Detached Study Management, as every TPS writes).
const DETACHED_STUDY_MANAGEMENT: &str = "1.2.840.10008.3.1.2.3.1";
const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";

fn el(tag: Tag, vr: VR, value: impl Into<String>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(value.into()))
}

fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn obj(elements: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

/// A decimal string of at most 16 characters (DS).
fn ds(v: f64) -> String {
    let s = format!("{v:.4}");
    if s.len() <= 16 { s } else { format!("{v:.6e}") }
}

fn image_ref(ct: &CtSeries, k: usize) -> InMemDicomObject {
    obj(vec![
        el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, &ct.sop_class_uid),
        el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, &ct.slices[k].sop_instance_uid),
    ])
}

/// What [`write_rtstruct`] wrote.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    /// (TG-263 name, contours, slices) of each organ with voxels.
    pub rois: Vec<(String, usize, usize)>,
    pub sop_instance_uid: String,
}

/// Writes `labels` (the CT's stored voxel order, label values of `organs`) as an RTSTRUCT
/// referencing `ct`.
pub fn write_rtstruct(
    ct: &CtSeries,
    labels: &[u16],
    organs: &OrganMap,
    path: &Path,
) -> DicomResult<ExportSummary> {
    let [w, h, nz] = ct.dims();
    if labels.len() != w * h * nz {
        return Err(DicomError::Write {
            path: path.into(),
            reason: format!("the label map has {} voxels, the CT {}", labels.len(), w * h * nz),
        });
    }
    let sop_uid = new_uid();
    let frame = ct.frame_of_reference_uid.clone().unwrap_or_else(new_uid);
    let now = time::OffsetDateTime::now_utc();
    let date = format!("{:04}{:02}{:02}", now.year(), u8::from(now.month()), now.day());
    let tod = format!("{:02}{:02}{:02}", now.hour(), now.minute(), now.second());

    let mut ss_rois = Vec::new();
    let mut roi_contours = Vec::new();
    let mut observations = Vec::new();
    let mut summary = Vec::new();
    for (number, (label, organ)) in organs.iter().enumerate() {
        let number = (number + 1).to_string();
        let known = shared::structures::known(organ);
        let name = known.map_or(organ.to_owned(), |k| k.tg263.to_owned());
        let colour = known.map_or([255, 255, 0], |k| k.colour);
        let mut contours = Vec::new();
        let mut slices = 0;
        for k in 0..nz {
            let plane = &labels[k * w * h..(k + 1) * w * h];
            let mask: Vec<bool> = plane.iter().map(|&l| l == label).collect();
            if !mask.contains(&true) {
                continue;
            }
            slices += 1;
            for poly in trace_boundaries(&mask, w, h) {
                let data: Vec<String> = poly
                    .iter()
                    .flat_map(|p| ct.to_patient([p[0], p[1], k as f64]))
                    .map(ds)
                    .collect();
                contours.push(obj(vec![
                    seq(tags::CONTOUR_IMAGE_SEQUENCE, vec![image_ref(ct, k)]),
                    el(tags::CONTOUR_GEOMETRIC_TYPE, VR::CS, "CLOSED_PLANAR"),
                    el(tags::NUMBER_OF_CONTOUR_POINTS, VR::IS, poly.len().to_string()),
                    DataElement::new(tags::CONTOUR_DATA, VR::DS, PrimitiveValue::Strs(data.into())),
                ]));
            }
        }
        if contours.is_empty() {
            continue;
        }
        summary.push((name.clone(), contours.len(), slices));
        ss_rois.push(obj(vec![
            el(tags::ROI_NUMBER, VR::IS, &number),
            el(tags::REFERENCED_FRAME_OF_REFERENCE_UID, VR::UI, &frame),
            el(tags::ROI_NAME, VR::LO, &name),
            el(tags::ROI_GENERATION_ALGORITHM, VR::CS, "AUTOMATIC"),
        ]));
        roi_contours.push(obj(vec![
            DataElement::new(
                tags::ROI_DISPLAY_COLOR,
                VR::IS,
                PrimitiveValue::Strs(colour.iter().map(|c| c.to_string()).collect()),
            ),
            seq(tags::CONTOUR_SEQUENCE, contours),
            el(tags::REFERENCED_ROI_NUMBER, VR::IS, &number),
        ]));
        observations.push(obj(vec![
            el(tags::OBSERVATION_NUMBER, VR::IS, &number),
            el(tags::REFERENCED_ROI_NUMBER, VR::IS, &number),
            el(tags::RTROI_INTERPRETED_TYPE, VR::CS, "ORGAN"),
            el(tags::ROI_INTERPRETER, VR::PN, ""),
        ]));
    }

    if ss_rois.is_empty() {
        return Err(DicomError::Write {
            path: path.into(),
            reason: "the label map holds no organ of the model, so there is no contour to write"
                .into(),
        });
    }
    let referenced_frame = obj(vec![
        el(tags::FRAME_OF_REFERENCE_UID, VR::UI, &frame),
        seq(
            tags::RT_REFERENCED_STUDY_SEQUENCE,
            vec![obj(vec![
                el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, DETACHED_STUDY_MANAGEMENT),
                el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, &ct.study_uid),
                seq(
                    tags::RT_REFERENCED_SERIES_SEQUENCE,
                    vec![obj(vec![
                        el(tags::SERIES_INSTANCE_UID, VR::UI, &ct.series_uid),
                        seq(
                            tags::CONTOUR_IMAGE_SEQUENCE,
                            (0..nz).map(|k| image_ref(ct, k)).collect(),
                        ),
                    ])],
                ),
            ])],
        ),
    ]);

    let mut ds_obj = obj(vec![
        el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
        el(tags::SOP_CLASS_UID, VR::UI, super::RT_STRUCTURE_SET_STORAGE),
        el(tags::SOP_INSTANCE_UID, VR::UI, &sop_uid),
        el(tags::MODALITY, VR::CS, "RTSTRUCT"),
        el(tags::MANUFACTURER, VR::LO, "fedtune"),
        el(tags::SERIES_INSTANCE_UID, VR::UI, new_uid()),
        el(tags::SERIES_NUMBER, VR::IS, "9001"),
        el(tags::SERIES_DESCRIPTION, VR::LO, "fedtune predicted organs at risk"),
        el(tags::INSTANCE_NUMBER, VR::IS, "1"),
        el(tags::STRUCTURE_SET_LABEL, VR::SH, "fedtune"),
        el(tags::STRUCTURE_SET_NAME, VR::LO, "fedtune prediction"),
        el(tags::STRUCTURE_SET_DATE, VR::DA, &date),
        el(tags::STRUCTURE_SET_TIME, VR::TM, &tod),
        el(tags::INSTANCE_CREATION_DATE, VR::DA, &date),
        el(tags::INSTANCE_CREATION_TIME, VR::TM, &tod),
        el(tags::APPROVAL_STATUS, VR::CS, "UNAPPROVED"),
        seq(tags::REFERENCED_FRAME_OF_REFERENCE_SEQUENCE, vec![referenced_frame]),
        seq(tags::STRUCTURE_SET_ROI_SEQUENCE, ss_rois),
        seq(tags::ROI_CONTOUR_SEQUENCE, roi_contours),
        seq(tags::RTROI_OBSERVATIONS_SEQUENCE, observations),
    ]);
    for (tag, vr, value) in &ct.patient_study.attributes {
        ds_obj.put(el(*tag, *vr, value));
    }
    // Type 2 patient and study attributes are present even when the CT lacks them.
    for (tag, vr) in [
        (tags::PATIENT_NAME, VR::PN),
        (tags::PATIENT_ID, VR::LO),
        (tags::PATIENT_BIRTH_DATE, VR::DA),
        (tags::PATIENT_SEX, VR::CS),
        (tags::STUDY_DATE, VR::DA),
        (tags::STUDY_TIME, VR::TM),
        (tags::STUDY_ID, VR::SH),
        (tags::ACCESSION_NUMBER, VR::SH),
        (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
    ] {
        if ds_obj.get(tag).is_none() {
            ds_obj.put(el(tag, vr, ""));
        }
    }
    ds_obj.put(el(tags::STUDY_INSTANCE_UID, VR::UI, &ct.study_uid));
    let file = ds_obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(EXPLICIT_VR_LITTLE_ENDIAN))
        .map_err(|e| DicomError::Write { path: path.into(), reason: e.to_string() })?;
    let tmp = path.with_extension("fedtune-tmp");
    file.write_to_file(&tmp)
        .map_err(|e| DicomError::Write { path: path.into(), reason: e.to_string() })?;
    std::fs::rename(&tmp, path)
        .map_err(|e| DicomError::Write { path: path.into(), reason: e.to_string() })?;
    Ok(ExportSummary { rois: summary, sop_instance_uid: sop_uid })
}
