//! What must never leave a site, and the check that it did not.

use std::path::Path;

use anyhow::Result;

/// Every string a manifest names that must never leave the site: case ids and file paths.
pub fn site_secrets(data_dir: &Path) -> Result<Vec<String>> {
    let m = site_agent::data::Manifest::load(&data_dir.join("manifest.toml"))?;
    let mut out = Vec::new();
    for c in &m.cases {
        out.push(c.id.clone());
        for p in [&c.image, &c.label] {
            out.push(p.display().to_string());
            if let Some(f) = p.file_name() {
                out.push(f.to_string_lossy().into_owned());
            }
        }
    }
    Ok(out)
}

/// Fails naming the RPC and the string when an audited outbound message carries any of
/// `secrets`.
pub fn assert_sends_none_of(
    site: &str,
    entries: &[site_agent::agent::audit::AuditEntry],
    secrets: &[String],
) {
    for e in entries {
        let bytes = e.message();
        for s in secrets {
            let found = bytes.windows(s.len()).any(|w| w == s.as_bytes());
            assert!(!found, "{site}: {} carries \"{s}\"", e.rpc);
        }
    }
}
