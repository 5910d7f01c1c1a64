//! The identifying labels of a region's series: `region`, and `namespace`, `pod`,
//! `container` when known.
//!
//! Precedence, per label: the identity the interposer wrote into the region header
//! (from the downward-API variables `POD_NAMESPACE`, `POD_NAME`, `CONTAINER_NAME`)
//! wins; where a header field is empty, the HAMi directory name
//! `<pod-uid>_<container>` fills in `container`, and `pod` (which is then the pod
//! UID, the only pod identity HAMi's layout carries). `namespace` comes only from the
//! header. Unknown labels are left out rather than exported empty.

use std::path::Path;
use vigil_region::RegionIdentity;

/// Labels shared by every series of one region, in export order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionLabels {
    pub region: String,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
}

impl RegionLabels {
    /// `(name, value)` pairs, `region` first, unknown ones skipped.
    pub fn pairs(&self) -> Vec<(&'static str, &str)> {
        let mut v = Vec::with_capacity(6);
        v.push(("region", self.region.as_str()));
        for (k, val) in [
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("container", &self.container),
        ] {
            if let Some(s) = val {
                v.push((k, s.as_str()));
            }
        }
        v
    }
}

/// What a HAMi directory name says: `(pod_uid, container)`.
///
/// HAMi mounts `<dir>/<pod-uid>_<container>/` into each container; pod UIDs contain no
/// `_` and container names (DNS-1123 labels) cannot, so the first `_` splits them.
pub fn from_hami_dir(rel: &Path) -> (Option<String>, Option<String>) {
    let mut comps = rel.components();
    let (Some(first), Some(_file), None) = (comps.next(), comps.next(), comps.next()) else {
        return (None, None);
    };
    let dir = first.as_os_str().to_string_lossy();
    match dir.split_once('_') {
        Some((pod, container)) if !pod.is_empty() && !container.is_empty() => {
            (Some(pod.to_string()), Some(container.to_string()))
        }
        _ => (None, None),
    }
}

/// Combines the region label, the HAMi directory (if `rel` is relative to a regions
/// directory) and the header identity, by the precedence documented above.
pub fn region_labels(region: &str, rel: Option<&Path>, identity: &RegionIdentity) -> RegionLabels {
    let (dir_pod, dir_container) = rel.map(from_hami_dir).unwrap_or((None, None));
    let pick = |header: &str, dir: Option<String>| {
        if header.is_empty() {
            dir
        } else {
            Some(header.to_string())
        }
    };
    RegionLabels {
        region: region.to_string(),
        namespace: pick(&identity.namespace, None),
        pod: pick(&identity.pod, dir_pod),
        container: pick(&identity.container, dir_container),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hami_dir_names_split_at_first_underscore() {
        let (p, c) = from_hami_dir(Path::new("0d6c-44_main/vigil.cache"));
        assert_eq!(p.as_deref(), Some("0d6c-44"));
        assert_eq!(c.as_deref(), Some("main"));
        assert_eq!(from_hami_dir(Path::new("x.cache")), (None, None));
        assert_eq!(
            from_hami_dir(Path::new("nounderscore/x.cache")),
            (None, None)
        );
        assert_eq!(from_hami_dir(Path::new("a_b/c/x.cache")), (None, None));
    }

    #[test]
    fn header_identity_wins_per_field() {
        let id = RegionIdentity {
            namespace: "ml".into(),
            pod: "trainer-0".into(),
            container: String::new(),
        };
        let l = region_labels("u1_main/a.cache", Some(Path::new("u1_main/a.cache")), &id);
        assert_eq!(l.namespace.as_deref(), Some("ml"));
        assert_eq!(l.pod.as_deref(), Some("trainer-0"));
        assert_eq!(l.container.as_deref(), Some("main"));
        let none = region_labels("/r.cache", None, &RegionIdentity::default());
        assert_eq!(none.pairs(), vec![("region", "/r.cache")]);
    }
}
