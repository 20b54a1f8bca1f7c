//! A weights file's safetensors header read on its own, from a reader or from chunks as they
//! arrive, so a file of any size is vetted holding only its header: the coordinator checks
//! uploads this way and never keeps a model in memory.

use std::collections::BTreeMap;
use std::io::Read;

use safetensors::Dtype;
use safetensors::tensor::Metadata;

use super::{WeightsError, WeightsManifest, WeightsResult, manifest_of};

/// The longest header read. A fedtune header lists a few hundred tensors and the manifest
/// (tens of KiB for a 103-layer net); safetensors itself allows 100 MB, which a server does
/// not hold for a stranger.
pub const MAX_HEADER_BYTES: usize = 16 << 20;

/// A weights file's header: its tensors' names, dtypes, shapes and offsets, and the manifest.
#[derive(Debug)]
pub struct Header {
    /// Bytes of header JSON after the 8-byte length.
    pub json_len: u64,
    pub metadata: Metadata,
    pub manifest: WeightsManifest,
}

impl Header {
    /// The size the whole file must have: the length, the header and the tensor data.
    pub fn file_size(&self) -> u64 {
        8 + self.json_len + self.metadata.data_len() as u64
    }

    /// Every tensor's dtype and shape, by name.
    pub fn tensors(&self) -> BTreeMap<String, (Dtype, Vec<usize>)> {
        self.metadata.tensors().into_iter().map(|(n, i)| (n, (i.dtype, i.shape.clone()))).collect()
    }

    fn parse(json: &[u8]) -> WeightsResult<Self> {
        let metadata: Metadata = serde_json::from_slice(json).map_err(|e| {
            WeightsError::Format(format!("the safetensors header is invalid ({e})"))
        })?;
        let manifest = manifest_of(&metadata)?;
        Ok(Self { json_len: json.len() as u64, metadata, manifest })
    }
}

fn json_len(prefix: [u8; 8]) -> WeightsResult<usize> {
    let n = u64::from_le_bytes(prefix);
    if n == 0 || n > MAX_HEADER_BYTES as u64 {
        return Err(WeightsError::Format(format!(
            "a safetensors header of {n} bytes (at most {MAX_HEADER_BYTES} are read)"
        )));
    }
    Ok(n as usize)
}

/// Reads only the header from the start of a file (8 + its length bytes).
pub fn read_header(reader: &mut impl Read) -> WeightsResult<Header> {
    let io = |e: std::io::Error| WeightsError::Format(format!("reading the header: {e}"));
    let mut prefix = [0u8; 8];
    reader.read_exact(&mut prefix).map_err(io)?;
    let mut json = vec![0u8; json_len(prefix)?];
    reader.read_exact(&mut json).map_err(io)?;
    Header::parse(&json)
}

/// Vets a weights file from its chunks in order: keeps the header until it is whole and
/// parses it, counts the rest against the size the header gives, and (when asked) checks
/// that every f32 of the data is finite. Memory: the header and three bytes.
#[derive(Debug, Default)]
pub struct Inspect {
    head: Vec<u8>,
    header: Option<Header>,
    /// Bytes seen in all.
    seen: u64,
    finite: Option<Finite>,
}

#[derive(Debug)]
struct Finite {
    carry: Vec<u8>,
    all: bool,
}

impl Finite {
    fn scan(&mut self, mut data: &[u8]) {
        if !self.carry.is_empty() {
            let take = (4 - self.carry.len()).min(data.len());
            self.carry.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.carry.len() < 4 {
                return;
            }
            let word = [self.carry[0], self.carry[1], self.carry[2], self.carry[3]];
            self.all &= f32::from_le_bytes(word).is_finite();
            self.carry.clear();
        }
        let words = data.chunks_exact(4);
        self.carry.extend_from_slice(words.remainder());
        self.all &=
            words.into_iter().all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite());
    }
}

/// What [`Inspect::finish`] found.
#[derive(Debug)]
pub struct Inspected {
    pub header: Header,
    /// With [`Inspect::checking_finite`]: whether every 4-byte word of the data is a finite
    /// f32 (meaningful when every tensor is f32).
    pub all_finite: Option<bool>,
}

impl Inspect {
    pub fn new() -> Self {
        Self::default()
    }

    /// Also checks that the data holds no NaN or infinity, read as f32.
    pub fn checking_finite(mut self) -> Self {
        self.finite = Some(Finite { carry: Vec::new(), all: true });
        self
    }

    /// The header, once its bytes have all arrived.
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// Takes the next chunk; fails as soon as the bytes cannot be a weights file (a bad or
    /// oversized header, more bytes than the header accounts for).
    pub fn update(&mut self, mut chunk: &[u8]) -> WeightsResult<()> {
        self.seen += chunk.len() as u64;
        if self.header.is_none() {
            if self.head.len() < 8 {
                let take = (8 - self.head.len()).min(chunk.len());
                self.head.extend_from_slice(&chunk[..take]);
                chunk = &chunk[take..];
                if self.head.len() < 8 {
                    return Ok(());
                }
            }
            let prefix: [u8; 8] = self.head[..8].try_into().expect("8 bytes");
            let need = 8 + json_len(prefix)?;
            let take = (need - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.head.len() < need {
                return Ok(());
            }
            self.header = Some(Header::parse(&self.head[8..])?);
            self.head = Vec::new();
        }
        let size = self.header.as_ref().map_or(0, Header::file_size);
        if self.seen > size {
            return Err(WeightsError::Format(format!(
                "more bytes than the {size} its header accounts for"
            )));
        }
        if let Some(f) = &mut self.finite {
            f.scan(chunk);
        }
        Ok(())
    }

    /// The header, once every byte has arrived and the size is the header's.
    pub fn finish(self) -> WeightsResult<Inspected> {
        let Some(header) = self.header else {
            return Err(WeightsError::Format(format!(
                "the file ends ({} bytes) inside its safetensors header",
                self.seen
            )));
        };
        if self.seen != header.file_size() {
            return Err(WeightsError::Format(format!(
                "{} bytes, and its header accounts for {}",
                self.seen,
                header.file_size()
            )));
        }
        Ok(Inspected { header, all_finite: self.finite.map(|f| f.all && f.carry.is_empty()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::architecture::ModelConfig;

    fn file(values: &[f32]) -> Vec<u8> {
        let organs = crate::organs::OrganMap::new(
            [(1, "brainstem".to_owned()), (2, "mandible".to_owned())].into(),
        )
        .expect("organs");
        let config = ModelConfig::preset("tiny").expect("preset");
        let manifest = WeightsManifest {
            format: super::super::FORMAT.into(),
            layers: config.layers(organs.num_classes()).into_iter().map(|l| l.name).collect(),
            config,
            organs,
            provenance: Default::default(),
            tail: None,
        };
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![values.len()], &data)
            .expect("view");
        let meta = std::collections::HashMap::from([(
            super::super::METADATA_KEY.to_owned(),
            serde_json::to_string(&manifest).expect("json"),
        )]);
        safetensors::serialize([("w", view)], Some(meta)).expect("serialize")
    }

    #[test]
    fn chunks_of_any_size_give_the_header_and_the_finite_check() {
        let good = file(&[1.0, -2.5, 3.0, 0.0, 7.0]);
        let whole = super::super::read_manifest(&good).expect("whole-file read");
        for size in [1, 3, 4, 7, 64, good.len()] {
            let mut i = Inspect::new().checking_finite();
            for c in good.chunks(size) {
                i.update(c).expect("update");
            }
            let got = i.finish().expect("finish");
            assert_eq!(got.header.manifest, whole, "chunks of {size}");
            assert_eq!(got.header.file_size(), good.len() as u64);
            assert_eq!(got.all_finite, Some(true), "chunks of {size}");
        }
        let nan = file(&[1.0, f32::NAN, 3.0]);
        for size in [1, 2, 5, nan.len()] {
            let mut i = Inspect::new().checking_finite();
            nan.chunks(size).for_each(|c| i.update(c).expect("update"));
            assert_eq!(i.finish().expect("finish").all_finite, Some(false), "chunks of {size}");
        }
        let header = read_header(&mut good.as_slice()).expect("read_header");
        assert_eq!(header.manifest, whole);
    }

    #[test]
    fn short_long_and_oversized_files_are_refused() {
        let good = file(&[1.0, 2.0]);
        let mut i = Inspect::new();
        i.update(&good[..good.len() - 1]).expect("short so far");
        assert!(i.finish().unwrap_err().to_string().contains("accounts for"));
        let mut i = Inspect::new();
        let mut long = good.clone();
        long.push(0);
        assert!(i.update(&long).unwrap_err().to_string().contains("more bytes"));
        let mut huge = ((MAX_HEADER_BYTES as u64) + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(Inspect::new().update(&huge).unwrap_err().to_string().contains("at most"));
        assert!(Inspect::new().finish().unwrap_err().to_string().contains("inside its"));
        assert!(read_header(&mut &good[..20]).is_err());
    }
}
