//! Weights files with their tensors: writing a network with its manifest, and loading one
//! back onto a device. The manifest format and its checks are [`shared::weights`]'s.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;
pub use shared::weights::{
    FORMAT, MAX_WEIGHTS_BYTES, METADATA_KEY, Provenance, WeightsManifest, read_manifest, sha256_hex,
};

use crate::model::{ModelError, Net};

/// What is wrong with a weights file's manifest (format, compatibility, config).
pub use shared::weights::WeightsError as ManifestError;

/// Why weights cannot be written or loaded: files, the manifest, the model.
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
    /// Not a fedtune weights file, or not one for this model and organ map.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// [`shared::weights::check_compatible`], with this module's error.
pub fn check_compatible(
    manifest: &WeightsManifest,
    organs: &shared::organs::OrganMap,
    config: Option<&crate::model::ModelConfig>,
) -> WeightsResult<()> {
    Ok(shared::weights::check_compatible(manifest, organs, config)?)
}

pub type WeightsResult<T> = Result<T, WeightsError>;

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
        .map_err(|e| ManifestError::Format(format!("cannot serialise tensors: {e}")).into())
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

/// Loads weights from bytes; returns the network, its manifest and its sha256.
pub fn from_bytes(bytes: &[u8], device: &Device) -> WeightsResult<(Net, WeightsManifest, String)> {
    let manifest = read_manifest(bytes)?;
    let tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| {
        WeightsError::from(ManifestError::Format(format!("cannot decode tensors: {e}")))
    })?;
    let net = Net::from_tensors(&manifest.config, &manifest.organs, tensors, device)?;
    Ok((net, manifest, sha256_hex(bytes)))
}

/// Loads a weights file.
pub fn load(path: &Path, device: &Device) -> WeightsResult<(Net, WeightsManifest, String)> {
    let len = std::fs::metadata(path)
        .map_err(|source| WeightsError::Io { path: path.to_owned(), source })?
        .len();
    if len > MAX_WEIGHTS_BYTES {
        return Err(ManifestError::Format(format!(
            "{} is {len} bytes, above the limit",
            path.display()
        ))
        .into());
    }
    let bytes =
        std::fs::read(path).map_err(|source| WeightsError::Io { path: path.to_owned(), source })?;
    from_bytes(&bytes, device).map_err(|e| match e {
        WeightsError::Manifest(ManifestError::Format(m)) => {
            ManifestError::Format(format!("{}: {m}", path.display())).into()
        }
        other => other,
    })
}
