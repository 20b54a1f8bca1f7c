//! Structure names: which organ a clinical structure name (a DICOM RTSTRUCT ROI) stands for.
//!
//! Every organ fedtune knows has its AAPM TG-263 standard name (`Brainstem`, `Bone_Mandible`,
//! `Parotid_L`, ...) and common aliases (`Brain Stem`, `Mandible`, `L Parotid`, `Lt Parotid`,
//! `Parotid Left`...). Names are compared after [`normalize`]: lower case, with every character
//! that is not a letter or a digit removed, so case and separators (space, `_`, `-`, `.`) never
//! matter. A center adds its own names with a TOML file:
//!
//! ```toml
//! [names]
//! brainstem = ["Tronc cerebral", "BS"]
//! parotid_l = ["Parotide G"]
//! ```
//!
//! Expanded structures are not organs: `Brainstem_PRV`, `Parotid_L_PRV5` or `Cord+5mm` match
//! nothing unless a center maps them on purpose.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::organs::OrganMap;

/// An organ fedtune knows: its label value, name, TG-263 name and display colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownOrgan {
    pub label: u16,
    /// fedtune's name, as in manifests and reports.
    pub name: &'static str,
    /// AAPM TG-263 standard name, as written in an exported RTSTRUCT.
    pub tg263: &'static str,
    /// RGB colour for ROIDisplayColor.
    pub colour: [u8; 3],
}

/// The organs at risk fedtune segments, with their standard label values.
pub const KNOWN_ORGANS: [KnownOrgan; 9] = [
    KnownOrgan { label: 1, name: "brainstem", tg263: "Brainstem", colour: [0, 255, 255] },
    KnownOrgan { label: 2, name: "spinal_cord", tg263: "SpinalCord", colour: [255, 255, 0] },
    KnownOrgan { label: 3, name: "mandible", tg263: "Bone_Mandible", colour: [255, 255, 255] },
    KnownOrgan { label: 4, name: "parotid_l", tg263: "Parotid_L", colour: [255, 128, 0] },
    KnownOrgan { label: 5, name: "parotid_r", tg263: "Parotid_R", colour: [0, 128, 255] },
    KnownOrgan {
        label: 6,
        name: "temporal_lobe_l",
        tg263: "Lobe_Temporal_L",
        colour: [255, 0, 255],
    },
    KnownOrgan {
        label: 7,
        name: "temporal_lobe_r",
        tg263: "Lobe_Temporal_R",
        colour: [128, 0, 255],
    },
    KnownOrgan { label: 8, name: "eye_l", tg263: "Eye_L", colour: [0, 255, 0] },
    KnownOrgan { label: 9, name: "eye_r", tg263: "Eye_R", colour: [255, 0, 0] },
];

/// The organ map of every known organ at its standard label value.
pub fn standard_organ_map() -> OrganMap {
    OrganMap::new(KNOWN_ORGANS.iter().map(|o| (o.label, o.name.to_owned())).collect())
        .expect("the known organs form a valid map")
}

/// The known organ called `name` (fedtune's name).
pub fn known(name: &str) -> Option<&'static KnownOrgan> {
    KNOWN_ORGANS.iter().find(|o| o.name == name)
}

/// Lower case, letters and digits only: "Brain Stem", "brain_stem" and "BRAIN-STEM" are equal.
pub fn normalize(name: &str) -> String {
    name.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect()
}

/// Aliases of each organ, before normalization. Sided organs get their side words added by
/// [`sided`].
fn builtin_aliases() -> Vec<(&'static str, Vec<String>)> {
    let one = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    vec![
        ("brainstem", one(&["Brainstem", "Brain Stem", "Brain_Stem"])),
        (
            "spinal_cord",
            one(&["SpinalCord", "Spinal Cord", "Cord", "Spinal_Cord", "Medulla_Spinalis"]),
        ),
        ("mandible", one(&["Bone_Mandible", "Mandible", "Mandibula", "Jaw", "Bone Mandible"])),
        ("parotid_l", sided(&["Parotid", "Parotid Gland", "Gland_Parotid"], Side::Left)),
        ("parotid_r", sided(&["Parotid", "Parotid Gland", "Gland_Parotid"], Side::Right)),
        (
            "temporal_lobe_l",
            sided(&["Lobe_Temporal", "Temporal Lobe", "TemporalLobe", "Temporal"], Side::Left),
        ),
        (
            "temporal_lobe_r",
            sided(&["Lobe_Temporal", "Temporal Lobe", "TemporalLobe", "Temporal"], Side::Right),
        ),
        ("eye_l", sided(&["Eye", "Globe", "Eyeball"], Side::Left)),
        ("eye_r", sided(&["Eye", "Globe", "Eyeball"], Side::Right)),
    ]
}

#[derive(Clone, Copy)]
enum Side {
    Left,
    Right,
}

/// `base` with the side before or after it, in every common spelling: Parotid_L, L Parotid,
/// Lt Parotid, Parotid Left, Left Parotid...
fn sided(bases: &[&str], side: Side) -> Vec<String> {
    let words: &[&str] = match side {
        Side::Left => &["L", "Lt", "Left"],
        Side::Right => &["R", "Rt", "Right"],
    };
    let mut out = Vec::new();
    for base in bases {
        for w in words {
            out.push(format!("{base}_{w}"));
            out.push(format!("{w}_{base}"));
        }
    }
    out
}

/// Structure name -> organ name, built in and from a center's file.
#[derive(Clone, Debug)]
pub struct NameMap {
    /// Normalized structure name -> organ name.
    map: BTreeMap<String, String>,
}

/// Why a names file was refused.
#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    #[error("cannot read the names file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("names file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamesFile {
    names: BTreeMap<String, Vec<String>>,
}

impl Default for NameMap {
    fn default() -> Self {
        Self::builtin()
    }
}

impl NameMap {
    /// TG-263 names and common aliases of every known organ.
    pub fn builtin() -> Self {
        let mut map = BTreeMap::new();
        for (organ, aliases) in builtin_aliases() {
            map.insert(normalize(organ), organ.to_owned());
            for a in aliases {
                map.insert(normalize(&a), organ.to_owned());
            }
        }
        Self { map }
    }

    /// The built-in map plus a center's names file; its names win over built-in aliases.
    pub fn with_file(path: &Path) -> Result<Self, NamesError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| NamesError::Io { path: path.to_owned(), source })?;
        let mut me = Self::builtin();
        me.add_toml(&text)
            .map_err(|reason| NamesError::Invalid { path: path.to_owned(), reason })?;
        Ok(me)
    }

    fn add_toml(&mut self, text: &str) -> Result<(), String> {
        let file: NamesFile = toml::from_str(text).map_err(|e| e.to_string())?;
        for (organ, names) in file.names {
            if known(&organ).is_none() {
                let all: Vec<_> = KNOWN_ORGANS.iter().map(|o| o.name).collect();
                return Err(format!(
                    "\"{organ}\" is not an organ fedtune knows; use one of {}",
                    all.join(", ")
                ));
            }
            for name in names {
                let key = normalize(&name);
                if key.is_empty() {
                    return Err(format!(
                        "the name \"{name}\" for {organ} has no letters or digits"
                    ));
                }
                self.map.insert(key, organ.clone());
            }
        }
        Ok(())
    }

    /// The organ a structure name stands for, if any.
    pub fn organ_of(&self, structure: &str) -> Option<&str> {
        self.map.get(&normalize(structure)).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_every_center_style_map_to_the_organ() {
        let m = NameMap::builtin();
        let check = |name: &str, want: Option<&str>| assert_eq!(m.organ_of(name), want, "{name}");
        for o in &KNOWN_ORGANS {
            check(o.tg263, Some(o.name));
            check(o.name, Some(o.name));
        }
        check("BrainStem", Some("brainstem"));
        check("Brain Stem", Some("brainstem"));
        check("BRAIN-STEM", Some("brainstem"));
        check("Mandible", Some("mandible"));
        check("L Parotid", Some("parotid_l"));
        check("Lt_Parotid", Some("parotid_l"));
        check("Parotid Right", Some("parotid_r"));
        check("Right Parotid Gland", Some("parotid_r"));
        check("Temporal Lobe L", Some("temporal_lobe_l"));
        check("Globe_R", Some("eye_r"));
        check("Spinal Cord", Some("spinal_cord"));
        check("brainstem_PRV", None);
        check("Parotid", None);
        check("BODY", None);
    }

    #[test]
    fn a_centers_file_adds_names_and_refuses_unknown_organs() {
        let mut m = NameMap::builtin();
        m.add_toml("[names]\nbrainstem = [\"Tronc cerebral\", \"BS\"]\n").expect("valid");
        assert_eq!(m.organ_of("tronc CEREBRAL"), Some("brainstem"));
        assert_eq!(m.organ_of("bs"), Some("brainstem"));
        let err = m.add_toml("[names]\nliver = [\"Liver\"]\n").expect_err("unknown organ");
        assert!(err.contains("liver") && err.contains("brainstem"), "{err}");
        assert!(m.add_toml("[names]\neye_l = [\"--\"]\n").is_err());
        assert!(m.add_toml("[nomes]\n").is_err());
    }
}
