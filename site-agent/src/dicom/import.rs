//! `site-agent import-dicom`: CT series and their RTSTRUCTs to NIfTI images, label maps and a
//! manifest that `check-data` accepts.
//!
//! Output, under `OUT`:
//! - `images/case-001.nii.gz`, `labels/case-001.nii.gz`, ...: canonical (LPS) volumes with
//!   the CT's affine; file names and case ids come from a running index, never from the data.
//! - `manifest.toml`: the standard organ map (every organ fedtune knows, at its standard label)
//!   and the cases; the last `--test` cases form the test split.
//! - `patient-key.local.toml` (mode 0600): which index is which patient, study, series and
//!   structure set. It holds identifiers, stays at the site, and nothing reads it but people.
//!
//! Overlapping ROIs: a voxel drawn in two organs takes the organ whose ROI is smaller (a small
//! organ inside or against a larger one keeps its voxels), and the overlap is reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::data::{Manifest, ManifestCase, Split, Volume, write_image, write_labels};
use shared::structures::{KNOWN_ORGANS, NameMap, standard_organ_map};

use super::rtstruct::{RtStruct, rasterize};
use super::series::{CtHeader, CtSeries};
use super::{DicomError, DicomResult};

/// Where the import reads from.
#[derive(Clone, Debug)]
pub enum Source {
    /// One CT series folder and its structure set.
    Case { ct: PathBuf, rtstruct: PathBuf },
    /// An export folder holding many patients, searched recursively.
    Root(PathBuf),
}

/// How the import runs.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub source: Source,
    pub out: PathBuf,
    pub names: NameMap,
    /// Cases (the last ones) in the test split; default: none for one case, a fifth (at least
    /// one) of several.
    pub test: Option<usize>,
}

/// What happened to one case, for the operator (printed, never sent).
#[derive(Clone, Debug, Default)]
pub struct CaseReport {
    pub id: String,
    pub dims: [usize; 3],
    pub spacing: [f32; 3],
    /// Organ -> (ROI names, voxels).
    pub organs: BTreeMap<String, (Vec<String>, usize)>,
    pub missing: Vec<String>,
    pub unmatched: Vec<String>,
    pub skipped: Vec<String>,
    pub overlaps: Vec<String>,
}

/// What the import did.
#[derive(Clone, Debug, Default)]
pub struct ImportReport {
    pub manifest: PathBuf,
    pub key_file: PathBuf,
    pub cases: Vec<CaseReport>,
    /// Series or structure sets found but not imported, with why.
    pub not_imported: Vec<String>,
}

/// One case to import: a CT series and the structure set drawn on it.
struct Pairing {
    ct: CtSeries,
    rtstruct: RtStruct,
}

/// Runs the import.
pub fn run(opts: &ImportOptions) -> DicomResult<ImportReport> {
    if opts.out.join("manifest.toml").exists() {
        return Err(DicomError::Write {
            path: opts.out.join("manifest.toml"),
            reason: "an import is already there; choose an empty folder for --out or remove it"
                .into(),
        });
    }
    let mut report = ImportReport::default();
    let pairings = match &opts.source {
        Source::Case { ct, rtstruct } => {
            let series = CtSeries::read_dir(ct)?;
            let rt = RtStruct::read(rtstruct)?;
            rt.check_refers_to(&series)?;
            vec![Pairing { ct: series, rtstruct: rt }]
        }
        Source::Root(root) => scan(root, &mut report.not_imported)?,
    };
    if pairings.is_empty() {
        let searched = match &opts.source {
            Source::Root(root) => root.clone(),
            Source::Case { ct, .. } => ct.clone(),
        };
        return Err(DicomError::File {
            path: searched,
            reason: format!(
                "no CT series with a structure set was found ({}); export each patient's planning \
                 CT together with its RTSTRUCT",
                report.not_imported.join("; ")
            ),
        });
    }
    for sub in ["images", "labels"] {
        let dir = opts.out.join(sub);
        std::fs::create_dir_all(&dir)
            .map_err(|e| DicomError::Write { path: dir, reason: e.to_string() })?;
    }
    let n = pairings.len();
    let default = match opts.source {
        Source::Case { .. } => 0,
        Source::Root(_) if n > 1 => (n / 5).max(1),
        Source::Root(_) => 0,
    };
    let test = opts.test.unwrap_or(default).min(n.saturating_sub(1));
    let mut cases = Vec::with_capacity(n);
    let mut key = String::from(
        "# fedtune import: which case index is which patient. This file holds patient\n\
         # identifiers: it stays at this site, is never sent anywhere, and no fedtune command\n\
         # reads it. Keep it with the hospital's other protected data.\n\n",
    );
    for (i, mut p) in pairings.into_iter().enumerate() {
        let id = format!("case-{:03}", i + 1);
        let (case_report, image_path, label_path) = import_case(&mut p, &id, opts)?;
        key.push_str(&key_entry(&id, &p));
        let split = if i < n - test { Split::Train } else { Split::Test };
        cases.push(ManifestCase { id, image: image_path, label: label_path, split });
        report.cases.push(case_report);
    }
    let manifest =
        Manifest { path: opts.out.join("manifest.toml"), organs: standard_organ_map(), cases };
    write_file(&manifest.path, &manifest.to_toml(), false)?;
    report.key_file = opts.out.join("patient-key.local.toml");
    write_file(&report.key_file, &key, true)?;
    report.manifest = manifest.path;
    Ok(report)
}

fn key_entry(id: &str, p: &Pairing) -> String {
    let q = |s: Option<&str>| toml::Value::String(s.unwrap_or("").to_owned()).to_string();
    format!(
        "[{id:?}]\npatient_id = {}\npatient_name = {}\nstudy_instance_uid = {}\n\
         series_instance_uid = {}\nrtstruct_sop_instance_uid = {}\nct_folder = {}\nrtstruct_file = {}\n\n",
        q(p.ct.patient_id.as_deref()),
        q(p.ct.patient_name.as_deref()),
        q(Some(&p.ct.study_uid)),
        q(Some(&p.ct.series_uid)),
        q(p.rtstruct.sop_instance_uid.as_deref()),
        q(p.ct.dir.to_str()),
        q(p.rtstruct.path.to_str()),
    )
}

fn write_file(path: &Path, text: &str, private: bool) -> DicomResult<()> {
    let fail = |e: std::io::Error| DicomError::Write { path: path.into(), reason: e.to_string() };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(fail)?;
    // A key file left by an earlier, failed import keeps its mode on open: set it before
    // anything is written.
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    }
    #[cfg(not(unix))]
    let _ = private;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)
}

fn import_case(
    p: &mut Pairing,
    id: &str,
    opts: &ImportOptions,
) -> DicomResult<(CaseReport, PathBuf, PathBuf)> {
    let image = p.ct.read_image()?;
    let dims = image.dims;
    let mut report = CaseReport { id: id.to_owned(), ..Default::default() };
    // Each organ's mask (union of every ROI that maps to it), in stored order.
    let mut organ_masks: BTreeMap<&'static str, Vec<bool>> = BTreeMap::new();
    for roi in &p.rtstruct.rois {
        let Some(organ) = opts.names.organ_of(&roi.name) else {
            report.unmatched.push(roi.name.clone());
            continue;
        };
        let known = shared::structures::known(organ).expect("the name map only names known organs");
        let r = rasterize(roi, &p.ct);
        report.skipped.extend(r.skipped.iter().map(|s| format!("{}: {s}", roi.name)));
        if r.voxels == 0 {
            report.skipped.push(format!("{}: no voxel of the CT grid is inside it", roi.name));
            continue;
        }
        let entry = report.organs.entry(known.name.to_owned()).or_default();
        entry.0.push(roi.name.clone());
        let mask = organ_masks.entry(known.name).or_insert_with(|| vec![false; r.mask.len()]);
        for (m, &b) in mask.iter_mut().zip(&r.mask) {
            *m |= b;
        }
    }
    for (organ, (rois, voxels)) in &mut report.organs {
        *voxels = organ_masks[organ.as_str()].iter().filter(|&&b| b).count();
        if rois.len() > 1 {
            report.skipped.push(format!(
                "{organ} is drawn by {} ROIs ({}); their union is used",
                rois.len(),
                rois.join(", ")
            ));
        }
    }
    report.missing = KNOWN_ORGANS
        .iter()
        .filter(|o| !organ_masks.contains_key(o.name))
        .map(|o| o.name.to_owned())
        .collect();
    // Larger organs first, so a smaller one drawn over them keeps its voxels.
    let mut order: Vec<(&str, usize)> =
        report.organs.iter().map(|(o, (_, v))| (o.as_str(), *v)).collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut labels = vec![0u16; image.data.len()];
    let mut overlaps: BTreeMap<(u16, u16), usize> = BTreeMap::new();
    for (organ, _) in &order {
        let label = shared::structures::known(organ).expect("known organ").label;
        for (l, &inside) in labels.iter_mut().zip(&organ_masks[organ]) {
            if inside {
                if *l != 0 {
                    *overlaps.entry((*l, label)).or_default() += 1;
                }
                *l = label;
            }
        }
    }
    let name_of = |l: u16| KNOWN_ORGANS.iter().find(|o| o.label == l).map_or("?", |o| o.name);
    report.overlaps = overlaps
        .iter()
        .map(|((big, small), n)| {
            format!(
                "{n} voxels drawn in both {} and {}: given to {}",
                name_of(*big),
                name_of(*small),
                name_of(*small)
            )
        })
        .collect();
    let label_volume = Volume { dims, data: labels, affine: image.affine };
    let (image, _) = image.to_canonical();
    let (label_volume, _) = label_volume.to_canonical();
    report.dims = image.dims;
    report.spacing = image.spacing();
    let image_path = opts.out.join("images").join(format!("{id}.nii.gz"));
    let label_path = opts.out.join("labels").join(format!("{id}.nii.gz"));
    write_image(&image_path, &image)?;
    write_labels(&label_path, &label_volume)?;
    Ok((report, image_path, label_path))
}

/// Finds every CT series and structure set under `root` and pairs them.
fn scan(root: &Path, not_imported: &mut Vec<String>) -> DicomResult<Vec<Pairing>> {
    let mut series: BTreeMap<String, Vec<CtHeader>> = BTreeMap::new();
    let mut structs = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    let mut unreadable: Vec<PathBuf> = Vec::new();
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|source| DicomError::Io { path: dir.clone(), source })?;
        for entry in entries {
            let path = entry.map_err(|source| DicomError::Io { path: dir.clone(), source })?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let Ok(obj) = super::open_header(&path) else {
                unreadable.push(path);
                continue;
            };
            let class =
                super::text(&obj, dicom_dictionary_std::tags::SOP_CLASS_UID).unwrap_or_default();
            let modality =
                super::text(&obj, dicom_dictionary_std::tags::MODALITY).unwrap_or_default();
            // A broken file skips itself (said in the report), not the whole export.
            if class == super::RT_STRUCTURE_SET_STORAGE || modality == "RTSTRUCT" {
                match RtStruct::read(&path) {
                    Ok(rt) => structs.push(rt),
                    Err(e) => not_imported.push(e.to_string()),
                }
            } else {
                match CtHeader::from_object(&path, &obj) {
                    Ok(Some(h)) => series.entry(h.series_uid.clone()).or_default().push(h),
                    Ok(None) => {}
                    Err(e) => not_imported.push(e.to_string()),
                }
            }
        }
    }
    if let Some(first) = unreadable.iter().min() {
        not_imported.push(format!(
            "{} files are not readable DICOM (for example {}): damaged, or not DICOM at all",
            unreadable.len(),
            first.display()
        ));
    }
    // Newest structure set per series.
    structs.sort_by(|a, b| b.date_time.cmp(&a.date_time).then(a.path.cmp(&b.path)));
    let mut out = Vec::new();
    let mut used = vec![false; structs.len()];
    for (uid, headers) in series {
        let dir = headers[0].path.parent().unwrap_or(root).to_path_buf();
        let ct = match CtSeries::from_headers(&dir, headers) {
            Ok(ct) => ct,
            Err(e) => {
                not_imported.push(format!("{e}"));
                continue;
            }
        };
        let matching: Vec<usize> =
            (0..structs.len()).filter(|&i| structs[i].refers_to(&ct) == Some(true)).collect();
        let Some(&first) = matching.first() else {
            not_imported
                .push(format!("CT series {uid} in {}: no RTSTRUCT refers to it", dir.display()));
            continue;
        };
        for &i in &matching[1..] {
            not_imported.push(format!(
                "{}: an older structure set of the same CT as {}",
                structs[i].path.display(),
                structs[first].path.display()
            ));
        }
        for &i in &matching {
            used[i] = true;
        }
        out.push(Pairing { ct, rtstruct: structs[first].clone() });
    }
    for (s, used) in structs.iter().zip(used) {
        if used {
            continue;
        }
        not_imported.push(if s.referenced_series.is_empty() && s.frames_of_reference.is_empty() {
            format!(
                "{}: names no CT series or frame of reference; import it with --ct DIR --rtstruct FILE",
                s.path.display()
            )
        } else {
            format!(
                "{}: the CT it references (series {:?}, frame of reference {:?}) is not in the folder",
                s.path.display(),
                s.referenced_series,
                s.frames_of_reference
            )
        });
    }
    // A stable order that depends on the data, not on the file system's.
    out.sort_by(|a, b| {
        (a.ct.study_uid.as_str(), a.ct.series_uid.as_str())
            .cmp(&(b.ct.study_uid.as_str(), b.ct.series_uid.as_str()))
    });
    Ok(out)
}
