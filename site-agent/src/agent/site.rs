//! The site as a task sees it: its data (read and checked at start), its policy, its storage
//! and the device the engine runs on.

use std::path::PathBuf;

use candle_core::Device;

use super::config::{Policy, SiteConfig};
use crate::data::{Manifest, Split};

/// Site data that failed the start-up check: the manifest and each problem (by case and file).
#[derive(Debug, thiserror::Error)]
#[error(
    "{} failed validation ({} problem(s)); fix them (`site-agent check-data --manifest {}` \
     re-checks) and start the agent again:\n  {}",
    manifest.display(),
    problems.len(),
    manifest.display(),
    problems.join("\n  ")
)]
pub struct SiteDataError {
    pub manifest: PathBuf,
    pub problems: Vec<String>,
}

/// Everything a task needs from the site.
#[derive(Debug)]
pub struct Site {
    pub manifest: Manifest,
    pub storage: PathBuf,
    pub policy: Policy,
    /// Smallest and largest voxel spacing per axis over the site's images (read at start).
    pub spacing_range: ([f64; 3], [f64; 3]),
    /// Where the engine runs (`agent.device`, selected at start).
    pub device: Device,
    pub device_info: crate::device::DeviceInfo,
}

impl Site {
    /// Opens the site's data: every case of the manifest is read and checked as `check-data`
    /// does, so an agent never starts on data that a task would later find invalid; every
    /// problem is returned, by case and file.
    pub fn open(
        cfg: &SiteConfig,
        selected: crate::device::Selected,
    ) -> Result<Self, SiteDataError> {
        let manifest = Manifest::load(&cfg.data.manifest).map_err(|e| SiteDataError {
            manifest: cfg.data.manifest.clone(),
            problems: vec![e.to_string()],
        })?;
        let (mut lo, mut hi) = ([f64::INFINITY; 3], [0f64; 3]);
        let mut problems = Vec::new();
        for case in &manifest.cases {
            match crate::data::load_case(case, &manifest.organs) {
                Ok(c) => {
                    for i in 0..3 {
                        lo[i] = lo[i].min(f64::from(c.image.spacing()[i]));
                        hi[i] = hi[i].max(f64::from(c.image.spacing()[i]));
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        if !problems.is_empty() {
            return Err(SiteDataError { manifest: cfg.data.manifest.clone(), problems });
        }
        Ok(Self {
            manifest,
            storage: cfg.storage.dir.clone(),
            policy: cfg.policy.clone(),
            spacing_range: (lo, hi),
            device: selected.device,
            device_info: selected.info,
        })
    }

    pub fn train_cases(&self) -> usize {
        self.manifest.cases_in(Split::Train).count()
    }
}
