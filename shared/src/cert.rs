//! Certificate validity, read ahead of time so that an expiring or expired certificate is
//! reported in words before a TLS handshake fails without them.

use std::path::Path;

/// When the first certificate of a PEM file is valid, in Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// Where a certificate stands at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Valid for this many more whole days.
    Valid { days_left: i64 },
    /// Expired this many whole days ago (0: within the last day).
    Expired { days_ago: i64 },
    /// Not valid before `not_before` (usually this machine's clock is wrong).
    NotYetValid,
}

impl Validity {
    /// Reads the first certificate of `pem`.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let (_, block) = x509_parser::pem::parse_x509_pem(pem)
            .map_err(|e| format!("not a PEM certificate ({e})"))?;
        let cert = block.parse_x509().map_err(|e| format!("unreadable certificate ({e})"))?;
        let v = cert.validity();
        Ok(Self { not_before: v.not_before.timestamp(), not_after: v.not_after.timestamp() })
    }

    /// Reads the certificate in `path`.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn standing(&self, now_unix: i64) -> Standing {
        if now_unix < self.not_before {
            Standing::NotYetValid
        } else if now_unix > self.not_after {
            Standing::Expired { days_ago: (now_unix - self.not_after) / 86_400 }
        } else {
            Standing::Valid { days_left: (self.not_after - now_unix) / 86_400 }
        }
    }
}

/// Days before expiry from which a party warns about its own certificate.
pub const WARN_DAYS: i64 = 30;

/// A party's own certificate, checked before it dials or serves: `Err` with the message when it
/// cannot be read, has expired or is not yet valid (`fix` says what to do), `Ok(Some(days))`
/// when it expires within [`WARN_DAYS`], `Ok(None)` otherwise. `role` names it ("site",
/// "server").
pub fn check_own(path: &Path, role: &str, fix: &str) -> Result<Option<i64>, String> {
    let v = Validity::from_file(path)
        .map_err(|e| format!("the {role} certificate cannot be read: {e}; {fix}"))?;
    match v.standing(now_unix()) {
        Standing::Expired { days_ago } => Err(format!(
            "the {role} certificate {} expired on {} ({days_ago} days ago) and will be \
             refused; {fix}",
            path.display(),
            utc(v.not_after)
        )),
        Standing::NotYetValid => Err(format!(
            "the {role} certificate {} is not valid before {}; check this machine's clock",
            path.display(),
            utc(v.not_before)
        )),
        Standing::Valid { days_left } if days_left < WARN_DAYS => Ok(Some(days_left)),
        Standing::Valid { .. } => Ok(None),
    }
}

/// Now, in Unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A date as `YYYY-MM-DD HH:MM UTC`.
pub fn utc(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => format!("{unix} (Unix seconds)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_standing() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_795_755_444), "2026-11-27 04:57 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
        let v = Validity { not_before: 100, not_after: 100 + 3 * 86_400 + 5 };
        assert_eq!(v.standing(50), Standing::NotYetValid);
        assert_eq!(v.standing(100), Standing::Valid { days_left: 3 });
        assert_eq!(v.standing(100 + 3 * 86_400 + 6), Standing::Expired { days_ago: 0 });
        assert_eq!(v.standing(100 + 5 * 86_400 + 6), Standing::Expired { days_ago: 2 });
        assert!(Validity::from_pem(b"not a certificate").is_err());
    }
}
