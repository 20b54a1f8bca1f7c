//! `site-agent import-dicom` and the DICOM side of `predict`.

use std::path::{Path, PathBuf};

use crate::data::{self, Labels};
use anyhow::{Result, bail};
use clap::Args;
use shared::structures::NameMap;

use super::out;
use crate::dicom::import::{ImportOptions, Source};
use crate::dicom::series::CtSeries;

#[derive(Debug, Args)]
pub struct ImportDicomArgs {
    /// Folder of one CT series (with --rtstruct).
    #[arg(long, requires = "rtstruct", conflicts_with = "root")]
    pub ct: Option<PathBuf>,
    /// The RTSTRUCT file drawn on that CT.
    #[arg(long, requires = "ct")]
    pub rtstruct: Option<PathBuf>,
    /// An export folder holding many patients (searched recursively; files are grouped by
    /// series, and each RTSTRUCT is matched to the CT series it references).
    #[arg(long, required_unless_present = "ct")]
    pub root: Option<PathBuf>,
    /// Output folder: images/, labels/, manifest.toml and the local patient key.
    #[arg(long)]
    pub out: PathBuf,
    /// This center's structure names (TOML: `[names]` organ = ["name", ...]), added to the
    /// TG-263 names and common aliases.
    #[arg(long)]
    pub names: Option<PathBuf>,
    /// Cases (the last ones) for the test split; default: a fifth of them with --root, none for
    /// one case.
    #[arg(long)]
    pub test: Option<usize>,
}

pub(super) fn import_dicom(a: &ImportDicomArgs) -> Result<()> {
    let names = match &a.names {
        Some(p) => NameMap::with_file(p)?,
        None => NameMap::builtin(),
    };
    let source = match (&a.ct, &a.rtstruct, &a.root) {
        (Some(ct), Some(rt), None) => Source::Case { ct: ct.clone(), rtstruct: rt.clone() },
        (None, None, Some(root)) => Source::Root(root.clone()),
        _ => bail!("give either --ct DIR --rtstruct FILE (one case) or --root DIR (many)"),
    };
    let report = crate::dicom::import::run(&ImportOptions {
        source,
        out: a.out.clone(),
        names,
        test: a.test,
    })?;
    for c in &report.cases {
        out(&format!(
            "{}: {}x{}x{} voxels of {:.2} x {:.2} x {:.2} mm",
            c.id, c.dims[0], c.dims[1], c.dims[2], c.spacing[0], c.spacing[1], c.spacing[2]
        ));
        for (organ, (rois, voxels)) in &c.organs {
            out(&format!("  {organ:<16} {voxels:>9} voxels  from {}", rois.join(", ")));
        }
        if !c.missing.is_empty() {
            out(&format!("  missing organs: {}", c.missing.join(", ")));
        }
        if !c.unmatched.is_empty() {
            out(&format!(
                "  structures matching no organ (add them with --names if they are one): {}",
                c.unmatched.join(", ")
            ));
        }
        for s in &c.skipped {
            out(&format!("  skipped: {s}"));
        }
        for s in &c.overlaps {
            out(&format!("  warning: overlapping structures: {s}"));
        }
    }
    for s in &report.not_imported {
        out(&format!("not imported: {s}"));
    }
    let m = data::Manifest::load(&report.manifest)?;
    let errors = m.check();
    if !errors.is_empty() {
        for e in &errors {
            tracing::error!("{e}");
        }
        bail!("{} imported cases failed validation (listed above)", errors.len());
    }
    let train = m.cases_in(data::Split::Train).count();
    out(&format!(
        "imported {} cases ({train} train, {} test) into {}; checked as check-data does",
        m.cases.len(),
        m.cases.len() - train,
        report.manifest.display()
    ));
    out(&format!(
        "the patient key {} holds identifiers: it stays at this site",
        report.key_file.display()
    ));
    Ok(())
}

/// A DICOM CT series read for prediction: the canonical image, and how to go back.
pub(super) struct DicomInput {
    series: CtSeries,
    pub(super) image: data::Image,
    orientation: data::Orientation,
}

pub(super) fn read_dicom_input(dir: &Path) -> Result<DicomInput> {
    let mut series = CtSeries::read_dir(dir)?;
    let stored = series.read_image()?;
    let (image, orientation) = stored.to_canonical();
    Ok(DicomInput { series, image, orientation })
}

/// Writes predicted `labels` (canonical) as an RTSTRUCT on `input`'s CT.
pub(super) fn write_prediction_rtstruct(
    input: &DicomInput,
    labels: &Labels,
    organs: &shared::organs::OrganMap,
    path: &Path,
) -> Result<()> {
    let stored = input.orientation.to_stored(&labels.data);
    let s = crate::dicom::export::write_rtstruct(&input.series, &stored, organs, path)?;
    for (name, contours, slices) in &s.rois {
        out(&format!("  {name:<16} {contours:>4} contours on {slices} slices"));
    }
    out(&format!(
        "wrote {} (RTSTRUCT on the CT in {})",
        path.display(),
        input.series.dir.display()
    ));
    Ok(())
}

/// `site-agent phantom --dicom`: phantom patients as a planning-system export.
pub(super) fn phantom_export(
    center: crate::data::phantom::Center,
    cases: usize,
    seed: u64,
    out_dir: &Path,
) -> Result<()> {
    for i in 0..cases {
        let (image, labels) = crate::data::phantom::center_case(center, seed, i);
        let ids = crate::dicom::synthetic::SeriesIds::seeded(
            &format!("PHANTOM-{center}-{:03}", i + 1),
            &format!("Phantom^{center}^{:03}", i + 1),
            &format!("fedtune phantom {center} seed {seed} case {i}"),
        );
        let dir = out_dir.join(format!("patient-{:03}", i + 1));
        crate::dicom::synthetic::write_case(&image, &labels, &ids, &dir)?;
    }
    out(&format!(
        "wrote {cases} {center} patients as DICOM (CT series and RTSTRUCT each) under {}",
        out_dir.display()
    ));
    Ok(())
}
