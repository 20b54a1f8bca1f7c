//! What the admin service answers about stored records (sites, models, studies), and what
//! the study lead should know about a round's sites before it starts.

use prost::Message;
use proto::pb;

use super::{Coordinator, SResult, now_s};
use crate::store::{ModelRecord, SiteRecord, StudyRecord};

pub(super) fn site_info(c: &Coordinator, s: &SiteRecord) -> pb::SiteInfo {
    pb::SiteInfo {
        name: s.name.clone(),
        approved: s.approved && !c.site_revoked(s),
        revoked: c.site_revoked(s),
        certificate_revoked: c.certificate_revoked(s),
        last_seen_unix: c.last_contact(s),
        capabilities: pb::Capabilities::decode(s.capabilities.as_slice())
            .ok()
            .filter(|_| !s.capabilities.is_empty()),
        dataset: pb::DatasetSummary::decode(s.dataset.as_slice())
            .ok()
            .filter(|_| !s.dataset.is_empty()),
        certificate_not_after_unix: s.cert_not_after,
    }
}

/// A round's sites that are revoked, and a sentence for each site the study lead should know
/// about: revoked (its task fails at once), never connected, not approved, or silent for a day
/// (its task waits until it returns or the round's deadline).
pub(super) fn site_warnings(
    c: &Coordinator,
    sites: &[&String],
) -> SResult<(Vec<String>, Vec<String>)> {
    let (mut revoked, mut warnings) = (Vec::new(), Vec::new());
    let now = now_s();
    for &name in sites {
        let Some(site) = c.store.site(name)? else {
            warnings.push(format!(
                "site {name} has never connected: its task waits until it does (or the \
                 round's deadline)"
            ));
            continue;
        };
        if c.site_revoked(&site) {
            warnings.push(format!("site {name} is revoked: its task fails at once"));
            revoked.push(name.clone());
            continue;
        }
        if !site.approved {
            warnings.push(format!(
                "site {name} is not approved: its task waits for `coordinator site approve {name}`"
            ));
        }
        let silent = now - c.last_contact(&site);
        if silent > 86_400 {
            warnings.push(format!(
                "site {name} was last seen {} days ago: its task waits until it returns (or the \
                 round's deadline)",
                silent / 86_400
            ));
        }
    }
    Ok((revoked, warnings))
}

pub(super) fn model_info(m: &ModelRecord) -> pb::ModelInfo {
    pb::ModelInfo {
        model: Some(pb::ModelRef { sha256: m.sha256.clone(), size: m.size, name: m.name.clone() }),
        created_unix: m.created,
        config: m.config.clone(),
        layers: m.layers,
    }
}

pub(super) fn study_info(c: &Coordinator, s: StudyRecord) -> pb::StudyInfo {
    pb::StudyInfo {
        base: (!s.base_sha256.is_empty()).then(|| c.model_ref(&s.base_sha256).ok()).flatten(),
        name: s.name,
        sites: s.sites,
        created_unix: s.created,
    }
}
