//! Weights files: safetensors whose `__metadata__` carries the model manifest under the key
//! `fedtune`, so a file says what architecture, organs and history its tensors belong to.
//!
//! A model's identity is the sha256 of its file. This module reads and checks the manifest from
//! the header alone, without decoding a tensor, so the coordinator can vet a pushed model; the
//! site agent's `weights` module writes and loads the tensors.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::architecture::{ConfigError, ModelConfig};
use crate::organs::OrganMap;

mod inspect;
pub use inspect::{Header, Inspect, Inspected, MAX_HEADER_BYTES, read_header};

/// Format tag written into every manifest.
pub const FORMAT: &str = "fedtune-weights/1";
/// The `__metadata__` key that holds the manifest JSON.
pub const METADATA_KEY: &str = "fedtune";
/// Weights files above this size are refused.
pub const MAX_WEIGHTS_BYTES: u64 = 2 << 30;

/// Where a set of weights came from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// sha256 of the weights this model was fine-tuned from; `None` when trained from scratch.
    pub parent_sha256: Option<String>,
    /// Layers trained (the last k); `None` when every layer was trained.
    pub trainable_layers: Option<usize>,
    pub epochs: usize,
    pub seed: u64,
    /// A site label where one was given; never a case identifier.
    #[serde(default)]
    pub site: Option<String>,
    /// Training slices seen per epoch.
    #[serde(default)]
    pub train_slices: usize,
    /// A federated average: which round, after how many steps, of which sites' tails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated: Option<Federated>,
}

/// How a federated average came to be.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Federated {
    pub round: String,
    /// The step this average closed (1-based) of `rounds`.
    pub step: u32,
    pub rounds: u32,
    /// The sites averaged, and their training cases (the weights), in the same order.
    pub sites: Vec<String>,
    pub cases: Vec<u32>,
    /// FedBN: the batch-norm statistics here are the average, but each site trains and scores
    /// with its own.
    pub keep_local_bn: bool,
    pub prox_mu: f64,
}

/// A tail file: only the tensors of the last `layers` layers, to apply over the model whose
/// file has sha256 `base_sha256` (the same config and organ map).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TailOf {
    pub base_sha256: String,
    pub layers: usize,
}

/// What `__metadata__["fedtune"]` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsManifest {
    pub format: String,
    pub config: ModelConfig,
    pub organs: OrganMap,
    /// Layer names in order; a file whose list differs from its config's is refused.
    pub layers: Vec<String>,
    pub provenance: Provenance,
    /// Present in a tail file (see [`TailOf`]): its tensors are those of the last
    /// `tail.layers` layers only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<TailOf>,
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("not a fedtune weights file: {0}")]
    Format(String),
    #[error(
        "weights were made for {what} {found}, but {expected} is required; use weights trained for this model and organ map"
    )]
    Incompatible { what: &'static str, found: String, expected: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

pub type WeightsResult<T> = Result<T, WeightsError>;

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Reads the manifest from safetensors bytes without decoding tensors.
pub fn read_manifest(bytes: &[u8]) -> WeightsResult<WeightsManifest> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| WeightsError::Format(format!("the safetensors header is invalid ({e})")))?;
    manifest_of(&meta)
}

/// The manifest a safetensors header carries, checked against its own config.
pub fn manifest_of(meta: &safetensors::tensor::Metadata) -> WeightsResult<WeightsManifest> {
    let json = meta.metadata().as_ref().and_then(|m| m.get(METADATA_KEY)).ok_or_else(|| {
        WeightsError::Format(format!("no \"{METADATA_KEY}\" entry in __metadata__"))
    })?;
    let manifest: WeightsManifest = serde_json::from_str(json)
        .map_err(|e| WeightsError::Format(format!("the manifest is invalid: {e}")))?;
    if manifest.format != FORMAT {
        return Err(WeightsError::Format(format!(
            "format \"{}\" is not \"{FORMAT}\"; this build cannot read it",
            manifest.format
        )));
    }
    manifest.config.validate()?;
    let expected = manifest.config.layers(manifest.organs.num_classes());
    let names: Vec<&str> = expected.iter().map(|l| l.name.as_str()).collect();
    if names != manifest.layers.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(WeightsError::Format(
            "the manifest's layer list does not match its config".to_owned(),
        ));
    }
    if let Some(t) = &manifest.tail {
        if t.layers == 0 || t.layers > names.len() {
            return Err(WeightsError::Format(format!(
                "a tail of {} layers of a {}-layer model",
                t.layers,
                names.len()
            )));
        }
        if t.base_sha256.len() != 64 || !t.base_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(WeightsError::Format("a tail's base_sha256 is not a sha256".into()));
        }
    }
    Ok(manifest)
}

impl WeightsManifest {
    /// The layers a tail file holds (the last `tail.layers`); `None` for a full model.
    pub fn tail_layer_names(&self) -> Option<&[String]> {
        self.tail.as_ref().map(|t| &self.layers[self.layers.len() - t.layers..])
    }
}

/// Whether tensor `name` (`<layer>.<tensor>`) belongs to one of `layers`.
pub fn in_layers(name: &str, layers: &[String]) -> bool {
    layers.iter().any(|l| name.strip_prefix(l.as_str()).is_some_and(|rest| rest.starts_with('.')))
}

/// Checks that weights fit a dataset's organ map and, when given, a required config.
pub fn check_compatible(
    manifest: &WeightsManifest,
    organs: &OrganMap,
    config: Option<&ModelConfig>,
) -> WeightsResult<()> {
    if &manifest.organs != organs {
        return Err(WeightsError::Incompatible {
            what: "organ map",
            found: format!("{:?}", manifest.organs.iter().collect::<Vec<_>>()),
            expected: format!("{:?}", organs.iter().collect::<Vec<_>>()),
        });
    }
    if let Some(c) = config
        && &manifest.config != c
    {
        return Err(WeightsError::Incompatible {
            what: "model config",
            found: manifest.config.name.clone(),
            expected: c.name.clone(),
        });
    }
    Ok(())
}

/// The sha256 and size of a file, read in 1 MiB pieces (memory does not grow with it).
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let n = std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
    Ok((hex::encode(h.finalize()), n))
}

/// A file's bytes as pieces of at most `size` bytes, in order, each read when asked for: what
/// an upload sends, holding one piece at a time.
#[derive(Debug)]
pub struct Pieces {
    file: std::fs::File,
    size: usize,
}

impl Pieces {
    pub fn open(path: &std::path::Path, size: usize) -> std::io::Result<Self> {
        Ok(Self { file: std::fs::File::open(path)?, size: size.max(1) })
    }
}

impl Iterator for Pieces {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::io::Read;
        let mut buf = vec![0u8; self.size];
        let mut filled = 0;
        while filled < buf.len() {
            match self.file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e)),
            }
        }
        (filled > 0).then(|| {
            buf.truncate(filled);
            Ok(buf)
        })
    }
}

/// A file's size and modification time, and when its bytes were last found to match their
/// sha256: what lets a store of weights hash a file once, not at every use.
#[derive(Clone, Copy, Debug)]
pub struct HashStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    at: std::time::SystemTime,
}

impl HashStamp {
    /// The file as `meta` describes it, stamped now.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self { len: meta.len(), modified: meta.modified().ok(), at: std::time::SystemTime::now() }
    }

    /// Whether `now` (a fresh stat) is the file this stamp's hash read. As git does for its
    /// index, a file modified within a second before its hash is not trusted (two writes
    /// within one tick of the file system's clock leave the same modification time).
    pub fn still(&self, now: &HashStamp) -> bool {
        self.len == now.len
            && self.modified == now.modified
            && self.modified.is_some_and(|m| m + std::time::Duration::from_secs(1) <= self.at)
    }
}
