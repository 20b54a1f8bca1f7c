//! `AdminService.Backup`: the archive ([`crate::backup`]) is written to a temporary file in
//! the blob store's `tmp/` under the write lock (so the state in it is one state), then
//! streamed in chunks; the last message carries its size and sha256. The file is removed
//! when the stream ends.

use std::io::Read;
use std::sync::Arc;

use proto::pb;
use sha2::{Digest, Sha256};
use tonic::Status;

use super::{Coordinator, FedStream, Feed, SResult, ServiceError};

/// Bytes per backup message.
const CHUNK: usize = 1 << 20;

impl Coordinator {
    pub(super) async fn backup(self: &Arc<Self>) -> SResult<FedStream<pb::BackupChunk>> {
        let tmp_dir = self.blobs.join("tmp");
        let io = |source| ServiceError::Io { path: tmp_dir.clone(), source };
        std::fs::create_dir_all(&tmp_dir).map_err(io)?;
        let file = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(io)?;
        let c = self.clone();
        let started = std::time::Instant::now();
        let (file, manifest) = tokio::task::spawn_blocking(move || {
            let _w = c.write.blocking_lock();
            let out = std::io::BufWriter::new(file.as_file());
            let manifest = crate::backup::write_archive(&c.store, &c.blobs, out);
            manifest.map(|m| (file, m))
        })
        .await
        .map_err(|e| ServiceError::Io {
            path: self.blobs.clone(),
            source: std::io::Error::other(e),
        })?
        .map_err(|e| {
            tracing::error!(error = %e, "backup");
            ServiceError::FailedPrecondition(format!("the backup could not be written: {e}"))
        })?;
        tracing::info!(
            files = manifest.files.len(),
            seconds = started.elapsed().as_secs_f64(),
            "backup written; streaming it"
        );
        let (feed, stream) = Feed::new(self.limits.idle_seconds, 4);
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut reader = match file.reopen() {
                Ok(f) => std::io::BufReader::new(f),
                Err(e) => {
                    let _ =
                        feed.send(Err(Status::internal(format!("reading the backup: {e}")))).await;
                    return;
                }
            };
            let (mut hash, mut total) = (Sha256::new(), 0u64);
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = match reader.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = feed
                            .send(Err(Status::internal(format!("reading the backup: {e}"))))
                            .await;
                        return;
                    }
                };
                buf.truncate(n);
                hash.update(&buf);
                total += n as u64;
                metrics.served(n as u64);
                let last = n == 0;
                let msg = pb::BackupChunk {
                    data: buf,
                    total_size: if last { total } else { 0 },
                    sha256: if last { hex::encode(hash.clone().finalize()) } else { String::new() },
                };
                if !feed.send(Ok(msg)).await || last {
                    break;
                }
            }
            drop(file);
        });
        Ok(stream)
    }
}
