//! Weights files: safetensors whose `__metadata__` carries the model manifest under the key
//! `fedtune`, so a file says what architecture, organs and history its tensors belong to.
//!
//! A model's identity is the sha256 of its file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{ModelConfig, ModelError, Net};
use crate::organs::OrganMap;

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
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read weights {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write weights {path}: {source}; check the folder exists and is writable")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a fedtune weights file: {0}")]
    Format(String),
    #[error(
        "weights were made for {what} {found}, but {expected} is required; use weights trained for this model and organ map"
    )]
    Incompatible { what: &'static str, found: String, expected: String },
    #[error(transparent)]
    Model(#[from] ModelError),
}

pub type WeightsResult<T> = Result<T, WeightsError>;

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Serialises a network and its provenance to safetensors bytes.
pub fn to_bytes(net: &Net, provenance: &Provenance) -> WeightsResult<Vec<u8>> {
    let manifest = WeightsManifest {
        format: FORMAT.to_owned(),
        config: net.config().clone(),
        organs: net.organs().clone(),
        layers: net.layer_names(),
        provenance: provenance.clone(),
    };
    let json = serde_json::to_string(&manifest).expect("manifest serialises");
    let tensors: Vec<(String, candle_core::Tensor)> =
        net.named_vars().into_iter().map(|(n, v)| (n, v.as_detached_tensor())).collect();
    let meta = HashMap::from([(METADATA_KEY.to_owned(), json)]);
    safetensors::serialize(tensors, Some(meta))
        .map_err(|e| WeightsError::Format(format!("cannot serialise tensors: {e}")))
}

/// Writes the weights atomically (temp file, fsync, rename); returns the file's sha256.
pub fn save(net: &Net, provenance: &Provenance, path: &Path) -> WeightsResult<String> {
    use std::io::Write;
    let bytes = to_bytes(net, provenance)?;
    let werr = |source| WeightsError::Write { path: path.to_owned(), source };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(werr)?;
    f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(werr)?;
    std::fs::rename(&tmp, path).map_err(werr)?;
    Ok(sha256_hex(&bytes))
}

/// Reads the manifest from safetensors bytes without decoding tensors.
pub fn read_manifest(bytes: &[u8]) -> WeightsResult<WeightsManifest> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| WeightsError::Format(format!("the safetensors header is invalid ({e})")))?;
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
    Ok(manifest)
}

/// Loads weights from bytes; returns the network, its manifest and its sha256.
pub fn from_bytes(bytes: &[u8], device: &Device) -> WeightsResult<(Net, WeightsManifest, String)> {
    let manifest = read_manifest(bytes)?;
    let tensors = candle_core::safetensors::load_buffer(bytes, device)
        .map_err(|e| WeightsError::Format(format!("cannot decode tensors: {e}")))?;
    let net = Net::from_tensors(&manifest.config, &manifest.organs, tensors, device)?;
    Ok((net, manifest, sha256_hex(bytes)))
}

/// Loads a weights file.
pub fn load(path: &Path, device: &Device) -> WeightsResult<(Net, WeightsManifest, String)> {
    let len = std::fs::metadata(path)
        .map_err(|source| WeightsError::Io { path: path.to_owned(), source })?
        .len();
    if len > MAX_WEIGHTS_BYTES {
        return Err(WeightsError::Format(format!(
            "{} is {len} bytes, above the limit",
            path.display()
        )));
    }
    let bytes =
        std::fs::read(path).map_err(|source| WeightsError::Io { path: path.to_owned(), source })?;
    from_bytes(&bytes, device).map_err(|e| match e {
        WeightsError::Format(m) => WeightsError::Format(format!("{}: {m}", path.display())),
        other => other,
    })
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
