//! Weights files with their tensors: writing a network with its manifest, and loading one
//! back onto a device. The manifest format and its checks are [`shared::weights`]'s.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;
pub use shared::weights::{
    FORMAT, Federated, MAX_WEIGHTS_BYTES, METADATA_KEY, Provenance, TailOf, WeightsManifest,
    in_layers, read_manifest, sha256_hex,
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
    serialize(net, &manifest_of(net, provenance, None))
}

/// The manifest of `net`'s weights (a tail's where `tail` is given).
fn manifest_of(net: &Net, provenance: &Provenance, tail: Option<TailOf>) -> WeightsManifest {
    WeightsManifest {
        format: FORMAT.to_owned(),
        config: net.config().clone(),
        organs: net.organs().clone(),
        layers: net.layer_names(),
        provenance: provenance.clone(),
        tail,
    }
}

/// The manifest and the tensors it covers (all of them, or a tail's) as safetensors bytes.
fn serialize(net: &Net, manifest: &WeightsManifest) -> WeightsResult<Vec<u8>> {
    let json = serde_json::to_string(manifest).expect("manifest serialises");
    let tail = manifest.tail_layer_names();
    let tensors: Vec<(String, candle_core::Tensor)> = net
        .named_vars()
        .into_iter()
        .filter(|(n, _)| tail.is_none_or(|layers| in_layers(n, layers)))
        .map(|(n, v)| (n, v.as_detached_tensor()))
        .collect();
    let meta = HashMap::from([(METADATA_KEY.to_owned(), json)]);
    safetensors::serialize(tensors, Some(meta))
        .map_err(|e| ManifestError::Format(format!("cannot serialise tensors: {e}")).into())
}

/// The tail of `net`: the tensors of its last `k` layers (parameters and batch-norm
/// statistics), with a manifest that names the model it applies to (`base_sha256`). What a
/// site uploads for federated averaging or a shared Model_ST instead of the whole model.
pub fn tail_to_bytes(
    net: &Net,
    k: usize,
    base_sha256: &str,
    provenance: &Provenance,
) -> WeightsResult<Vec<u8>> {
    if k == 0 || k > net.num_layers() {
        return Err(ManifestError::Format(format!(
            "a tail of {k} layers of a {}-layer model",
            net.num_layers()
        ))
        .into());
    }
    let tail = TailOf { base_sha256: base_sha256.to_owned(), layers: k };
    serialize(net, &manifest_of(net, provenance, Some(tail)))
}

/// Which of a tail's tensors [`apply_tail`] sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TailPart {
    /// Every tensor of the tail.
    All,
    /// Only batch-norm running statistics (FedBN: a site's own, over an averaged tail).
    Statistics,
}

/// Whether a tensor name is a batch-norm running statistic.
pub fn is_statistic(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// Sets `net`'s last layers from a tail file made for the model with sha256 `base_sha256`:
/// refused unless its config and organ map are `net`'s, it names that base, and it holds
/// exactly the tensors of its layers with their shapes. Returns the tail's manifest.
pub fn apply_tail(
    net: &Net,
    bytes: &[u8],
    base_sha256: &str,
    part: TailPart,
) -> WeightsResult<WeightsManifest> {
    let manifest = read_manifest(bytes)?;
    let Some(tail) = &manifest.tail else {
        return Err(ManifestError::Format("a full model where a tail was expected".into()).into());
    };
    if tail.base_sha256 != base_sha256 {
        return Err(ManifestError::Incompatible {
            what: "base model",
            found: tail.base_sha256.clone(),
            expected: base_sha256.to_owned(),
        }
        .into());
    }
    check_compatible(&manifest, net.organs(), Some(net.config()))?;
    let layers = manifest.tail_layer_names().unwrap_or_default().to_vec();
    let device = net.device().clone();
    let mut tensors = candle_core::safetensors::load_buffer(bytes, &device).map_err(|e| {
        WeightsError::from(ManifestError::Format(format!("cannot decode tensors: {e}")))
    })?;
    let wanted: Vec<(String, candle_core::Var)> =
        net.named_vars().into_iter().filter(|(n, _)| in_layers(n, &layers)).collect();
    let mut set = Vec::with_capacity(wanted.len());
    for (name, var) in &wanted {
        let t = tensors.remove(name).ok_or_else(|| {
            ModelError::Mismatch(format!("tensor \"{name}\" is missing from the tail"))
        })?;
        if t.dims() != var.dims() {
            return Err(ModelError::Mismatch(format!(
                "tail tensor \"{name}\" has shape {:?}, the model expects {:?}",
                t.dims(),
                var.dims()
            ))
            .into());
        }
        set.push((var, t));
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(ModelError::Mismatch(format!(
            "the tail holds tensor \"{extra}\", which is not one of its layers'"
        ))
        .into());
    }
    // Checked in full before any tensor changes: a bad tail leaves the net as it was.
    for ((name, _), (var, t)) in wanted.iter().zip(set) {
        if part == TailPart::All || is_statistic(name) {
            let t = t
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.to_device(&device))
                .map_err(ModelError::from)?;
            var.set(&t).map_err(ModelError::from)?;
        }
    }
    Ok(manifest)
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
    let (net, manifest) = decode(bytes, device)?;
    Ok((net, manifest, sha256_hex(bytes)))
}

/// Decodes weights whose sha256 is already known (checked as they were downloaded).
pub fn decode(bytes: &[u8], device: &Device) -> WeightsResult<(Net, WeightsManifest)> {
    let manifest = read_manifest(bytes)?;
    let tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| {
        WeightsError::from(ManifestError::Format(format!("cannot decode tensors: {e}")))
    })?;
    let net = Net::from_tensors(&manifest.config, &manifest.organs, tensors, device)?;
    Ok((net, manifest))
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
