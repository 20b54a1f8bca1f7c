//! The organ label map: which integer label value stands for which organ at risk.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Label value -> organ name. Label 0 is always background and never appears in the map.
///
/// The map is ordered by label value; a model's output channel `i` (for `i >= 1`) predicts the
/// `i`-th entry in that order, so a model and a dataset agree when their maps are equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrganMap(BTreeMap<u16, String>);

/// Why an organ map was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OrganMapError {
    #[error("the organ map is empty: list at least one organ as `<label> = \"<name>\"`")]
    Empty,
    #[error("label 0 is background and cannot name an organ (\"{0}\"); start organ labels at 1")]
    Background(String),
    #[error("organ name \"{0}\" is used for more than one label; give each label its own name")]
    DuplicateName(String),
    #[error("organ label {0} has an empty name")]
    EmptyName(u16),
    #[error("label key \"{0}\" is not an integer between 1 and 65535")]
    BadKey(String),
}

impl OrganMap {
    /// Builds a map, checking that it is non-empty, has no label 0 and no repeated names.
    pub fn new(map: BTreeMap<u16, String>) -> Result<Self, OrganMapError> {
        if map.is_empty() {
            return Err(OrganMapError::Empty);
        }
        if let Some(name) = map.get(&0) {
            return Err(OrganMapError::Background(name.clone()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (label, name) in &map {
            if name.trim().is_empty() {
                return Err(OrganMapError::EmptyName(*label));
            }
            if !seen.insert(name.as_str()) {
                return Err(OrganMapError::DuplicateName(name.clone()));
            }
        }
        Ok(Self(map))
    }

    /// Parses the TOML/JSON form, whose keys are strings ("1" = "brainstem").
    pub fn from_string_keys(
        map: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, OrganMapError> {
        let mut out = BTreeMap::new();
        for (key, name) in map {
            let label: u16 = key.trim().parse().map_err(|_| OrganMapError::BadKey(key.clone()))?;
            out.insert(label, name);
        }
        Self::new(out)
    }

    /// The number of model output classes: background plus one per organ.
    pub fn num_classes(&self) -> usize {
        self.0.len() + 1
    }

    /// Organs in label order.
    pub fn iter(&self) -> impl Iterator<Item = (u16, &str)> {
        self.0.iter().map(|(k, v)| (*k, v.as_str()))
    }

    /// Label values in order.
    pub fn labels(&self) -> Vec<u16> {
        self.0.keys().copied().collect()
    }

    /// Organ names in label order.
    pub fn names(&self) -> Vec<&str> {
        self.0.values().map(String::as_str).collect()
    }

    pub fn contains(&self, label: u16) -> bool {
        self.0.contains_key(&label)
    }

    pub fn name(&self, label: u16) -> Option<&str> {
        self.0.get(&label).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Lookup table from a label value to the model class index (0 = background), for labels
    /// up to the largest one in the map.
    pub fn class_lut(&self) -> Vec<u32> {
        let max = self.0.keys().copied().max().unwrap_or(0) as usize;
        let mut lut = vec![0u32; max + 1];
        for (class, label) in self.0.keys().enumerate() {
            lut[*label as usize] = class as u32 + 1;
        }
        lut
    }

    /// Inverse of [`OrganMap::class_lut`]: model class index -> label value.
    pub fn class_to_label(&self) -> Vec<u16> {
        std::iter::once(0).chain(self.0.keys().copied()).collect()
    }
}
