//! The model blob store: uploads received into `blobs/tmp`, checked and renamed under
//! `blobs/<sha256>`.

use std::path::PathBuf;
use std::time::Duration;

use proto::{limits, pb};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

use super::{Coordinator, SResult, ServiceError, now_s};
use crate::store::ModelRecord;

/// What else an upload must be, given its header as read on the way in (and, where the
/// caller asked, whether every f32 was finite); the error says what is wrong.
pub(crate) type WeightsCheck<'a> =
    dyn Fn(&shared::weights::Inspected) -> Result<(), String> + Sync + 'a;

impl Coordinator {
    /// Receives a weights file from the messages after an upload's header (`chunk_of` takes a
    /// message's chunk; anything else is a second header), at most 1 MiB each: checks the
    /// header, and streams each chunk once through the sha256, the safetensors-header reader
    /// ([`shared::weights::Inspect`]; with `finite`, the NaN check too) and into a temp file;
    /// verifies size, sha256 and that it is a fedtune weights file, fsyncs and renames it
    /// under `blobs/<sha256>`. Memory: one chunk and the header, whatever the model's size.
    /// Nothing is stored on any error.
    pub(crate) async fn receive_blob<M>(
        &self,
        name: String,
        header: &pb::ModelRef,
        mut stream: tonic::Streaming<M>,
        chunk_of: fn(M) -> Option<Vec<u8>>,
        finite: bool,
        check: &WeightsCheck<'_>,
    ) -> SResult<ModelRecord> {
        let c = self;
        if header.size == 0 || header.size > limits::MAX_MODEL_BYTES {
            return Err(ServiceError::InvalidArgument(format!(
                "model size {} is outside 1..={}",
                header.size,
                limits::MAX_MODEL_BYTES
            )));
        }
        if header.sha256.len() != 64 || !header.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ServiceError::InvalidArgument("sha256 must be 64 hex digits".into()));
        }
        let sha = header.sha256.to_ascii_lowercase();
        let tmp_dir = c.blobs.join("tmp");
        let io = |path: &std::path::Path| {
            let path = path.to_owned();
            move |source| ServiceError::Io { path, source }
        };
        tokio::fs::create_dir_all(&tmp_dir).await.map_err(io(&tmp_dir))?;
        let tmp = tmp_dir.join(format!("upload-{:016x}", rand::random::<u64>()));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut inspect = shared::weights::Inspect::new();
            if finite {
                inspect = inspect.checking_finite();
            }
            let refused = |e: shared::weights::WeightsError| {
                ServiceError::InvalidArgument(format!("not a fedtune weights file: {e}"))
            };
            let idle = Duration::from_secs(u64::from(c.limits.idle_seconds));
            loop {
                let Ok(next) = tokio::time::timeout(idle, stream.next()).await else {
                    return Err(ServiceError::Stalled(format!(
                        "upload stalled: no chunk for {} s after {size} of {} bytes; the \
                         upload was ended, start it again",
                        idle.as_secs(),
                        header.size
                    )));
                };
                let Some(msg) = next else { break };
                let msg = msg.map_err(|s| ServiceError::InvalidArgument(format!("upload: {s}")))?;
                let Some(chunk) = chunk_of(msg) else {
                    return Err(ServiceError::InvalidArgument(
                        "a second header in one upload".into(),
                    ));
                };
                if chunk.len() > limits::CHUNK_BYTES {
                    return Err(ServiceError::InvalidArgument(format!(
                        "chunk of {} bytes; at most {}",
                        chunk.len(),
                        limits::CHUNK_BYTES
                    )));
                }
                size += chunk.len() as u64;
                if size > header.size {
                    return Err(ServiceError::InvalidArgument(format!(
                        "more bytes than the header's size {}",
                        header.size
                    )));
                }
                hasher.update(&chunk);
                inspect.update(&chunk).map_err(refused)?;
                file.write_all(&chunk).await.map_err(io(&tmp))?;
            }
            if size != header.size {
                return Err(ServiceError::InvalidArgument(format!(
                    "upload ended at {size} of {} bytes",
                    header.size
                )));
            }
            let got = hex::encode(hasher.finalize());
            if got != sha {
                return Err(ServiceError::InvalidArgument(format!(
                    "sha256 of the upload is {got}, the header said {sha}"
                )));
            }
            let inspected = inspect.finish().map_err(refused)?;
            check(&inspected).map_err(|e| {
                ServiceError::InvalidArgument(format!("the weights are refused: {e}"))
            })?;
            file.sync_all().await.map_err(io(&tmp))?;
            Ok(inspected.header.manifest)
        }
        .await;
        let manifest = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        let dest = c.blob_path(&sha);
        tokio::fs::rename(&tmp, &dest).await.map_err(io(&dest))?;
        if let Ok(dir) = tokio::fs::File::open(&c.blobs).await {
            let _ = dir.sync_all().await;
        }
        // Hashed on the way in: the first download need not hash it again.
        c.note_verified(&sha).await;
        Ok(ModelRecord::of(sha, header.size, name, now_s(), &manifest))
    }

    pub(super) fn blob_path(&self, sha256: &str) -> PathBuf {
        self.blobs.join(sha256)
    }

    /// Remembers that `blobs/<sha256>` as it is now (size and modification time) matches its
    /// name.
    async fn note_verified(&self, sha256: &str) {
        if let Ok(meta) = tokio::fs::metadata(self.blob_path(sha256)).await {
            let stamp = shared::weights::HashStamp::of(&meta);
            self.verified.lock().await.insert(sha256.to_owned(), stamp);
        }
    }

    /// The stored blob of `sha256` and its size, checked to still be what was pushed: hashed
    /// once per size and modification time (at its first download after a start, or when the
    /// file changed; see [`shared::weights::HashStamp::still`]), not at every download. A damaged blob is never sent. Concurrent first
    /// downloads wait for one hash.
    pub(super) async fn verified_blob(&self, sha256: &str) -> SResult<(PathBuf, u64)> {
        let path = self.blob_path(sha256);
        let io = |source| ServiceError::Io { path: path.clone(), source };
        let mut verified = self.verified.lock().await;
        let meta = tokio::fs::metadata(&path).await.map_err(io)?;
        let stamp = shared::weights::HashStamp::of(&meta);
        if verified.get(sha256).is_some_and(|v| v.still(&stamp)) {
            return Ok((path, meta.len()));
        }
        let blob = path.clone();
        let (stored, _) = tokio::task::spawn_blocking(move || shared::weights::sha256_file(&blob))
            .await
            .map_err(|e| io(std::io::Error::other(e)))?
            .map_err(io)?;
        if stored != sha256 {
            tracing::error!(
                sha256,
                found = %stored,
                path = %path.display(),
                "a stored model no longer matches its sha256; not sent. Push it again"
            );
            verified.remove(sha256);
            return Err(ServiceError::DataLoss(format!(
                "the coordinator's copy of model {sha256} is damaged; the study lead must push \
                 it again"
            )));
        }
        verified.insert(sha256.to_owned(), stamp);
        Ok((path, meta.len()))
    }

    /// Writes bytes the coordinator made (an average) under `blobs/<sha256>`, atomically;
    /// returns their sha256. Writing the same bytes again changes nothing.
    pub(super) async fn put_blob(&self, bytes: Vec<u8>) -> SResult<String> {
        let sha = hex::encode(Sha256::digest(&bytes));
        let dest = self.blob_path(&sha);
        let tmp = self.blobs.join("tmp").join(format!("made-{:016x}", rand::random::<u64>()));
        let (d, t) = (dest.clone(), tmp.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            std::fs::create_dir_all(t.parent().expect("tmp has a parent"))?;
            let mut f = std::fs::File::create(&t)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&t, &d)
        })
        .await
        .map_err(|e| ServiceError::Io { path: tmp.clone(), source: std::io::Error::other(e) })?
        .map_err(|source| ServiceError::Io { path: dest, source })?;
        self.note_verified(&sha).await;
        Ok(sha)
    }
}
