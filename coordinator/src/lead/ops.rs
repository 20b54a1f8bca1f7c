//! `coordinator backup` (asks the running coordinator for an archive of its state) and
//! `coordinator completions`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use proto::pb;
use sha2::{Digest, Sha256};

use super::{Conn, out, status};

/// Writes the running coordinator's backup to `path`: received into `path.partial`, checked
/// against the size and sha256 the last message gives, then renamed.
pub(super) async fn backup(path: &Path, conn: &Conn) -> Result<()> {
    if path.exists() {
        bail!(
            "{} exists already; choose another --out (a backup never overwrites)",
            path.display()
        );
    }
    let partial = path.with_extension("partial");
    let mut client = super::connect(conn).await?;
    let mut stream = client.backup(pb::BackupRequest {}).await.map_err(status)?.into_inner();
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?,
    );
    let (mut hash, mut size) = (Sha256::new(), 0u64);
    let last = loop {
        let Some(chunk) = stream.message().await.map_err(status)? else {
            let _ = std::fs::remove_file(&partial);
            bail!("the coordinator ended the backup before its last message; try again");
        };
        hash.update(&chunk.data);
        size += chunk.data.len() as u64;
        file.write_all(&chunk.data).with_context(|| format!("writing {}", partial.display()))?;
        if !chunk.sha256.is_empty() {
            break chunk;
        }
    };
    let got = hex::encode(hash.finalize());
    if got != last.sha256 || size != last.total_size {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "the backup arrived damaged ({size} bytes with sha256 {got}, the coordinator sent {} \
             bytes with {}); try again",
            last.total_size,
            last.sha256
        );
    }
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all().with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming to {}", path.display()))?;
    out(&format!("backup written to {} ({size} bytes, sha256 {got})", path.display()));
    Ok(())
}

pub(super) fn completions(shell: clap_complete::Shell) {
    use clap::CommandFactory;
    let mut cmd = super::Cli::command();
    clap_complete::generate(shell, &mut cmd, "coordinator", &mut std::io::stdout());
}
