//! The identifying labels of a region's series: `region`, and `namespace`, `pod`,
//! `pod_uid`, `container` when known.
//!
//! These labels are tenancy keys in Prometheus, so they come only from sources the
//! exporter's operator controls (docs/security.md, F3). Precedence, per label:
//!
//! 1. `--labels.namespace`, `--labels.pod`, `--labels.container`: fixed values set
//!    by whoever deploys the exporter (the sidecar passes its own downward-API
//!    `POD_NAMESPACE`/`POD_NAME`); they apply to every region.
//! 2. With `--labels.from-region-identity` only: the identity block the interposer
//!    wrote into the region header (`POD_NAMESPACE`, `POD_NAME`, `CONTAINER_NAME`
//!    of the first process). Any process that can write the region can forge it,
//!    so it is off by default.
//! 3. The HAMi directory name `<pod-uid>_<container>` (created by the device
//!    plugin; a tenant cannot rename it): `pod_uid` and `container`. The UID goes in
//!    its own label, never in `pod`, so that `pod` always means a pod *name* and
//!    series join kube-state-metrics' `kube_pod_info{uid}` (the recording rules in
//!    alerts/vigil-alerts.yml add `namespace` and `pod` that way).
//!
//! Unknown labels are left out rather than exported empty.

use std::path::Path;
use vigil_region::RegionIdentity;

/// Labels shared by every series of one region, in export order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionLabels {
    pub region: String,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
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
            ("pod_uid", &self.pod_uid),
            ("container", &self.container),
        ] {
            if let Some(s) = val {
                v.push((k, s.as_str()));
            }
        }
        v
    }
}

/// Where labels may come from (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelPolicy {
    /// Trust the tenant-written identity block of each region.
    pub from_region_identity: bool,
    /// Fixed values from the operator, applied to every region.
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
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

/// Combines the region label, the operator's fixed labels, the region identity (only
/// if the policy trusts it) and the HAMi directory (if `rel` is relative to a regions
/// directory), by the precedence documented above.
pub fn region_labels(
    region: &str,
    rel: Option<&Path>,
    identity: &RegionIdentity,
    policy: &LabelPolicy,
) -> RegionLabels {
    let (dir_pod, dir_container) = rel.map(from_hami_dir).unwrap_or((None, None));
    // Under a `<pod-uid>_<container>/` directory, `pod_uid` and `container` already
    // say which directory: `region` is then the file name alone. (A fifth of every
    // line of a DaemonSet's scrape was the directory name said twice.)
    let region = match (&dir_pod, rel.and_then(Path::file_name)) {
        (Some(_), Some(file)) => file.to_string_lossy().into_owned(),
        _ => region.to_string(),
    };
    let nonempty = |s: &Option<String>| s.as_ref().filter(|v| !v.is_empty()).cloned();
    let claimed = |header: &str| {
        (policy.from_region_identity && !header.is_empty()).then(|| header.to_string())
    };
    RegionLabels {
        region,
        namespace: nonempty(&policy.namespace).or_else(|| claimed(&identity.namespace)),
        pod: nonempty(&policy.pod).or_else(|| claimed(&identity.pod)),
        pod_uid: dir_pod,
        container: nonempty(&policy.container)
            .or_else(|| claimed(&identity.container))
            .or(dir_container),
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

    fn forged() -> RegionIdentity {
        RegionIdentity {
            namespace: "kube-system".into(),
            pod: "victim-0".into(),
            container: String::new(),
        }
    }

    #[test]
    fn region_identity_is_ignored_by_default() {
        let rel = Path::new("u1_main/a.cache");
        let l = region_labels(
            "u1_main/a.cache",
            Some(rel),
            &forged(),
            &LabelPolicy::default(),
        );
        assert_eq!(l.namespace, None);
        assert_eq!(l.pod, None, "a UID is never exported as a pod name");
        assert_eq!(l.pod_uid.as_deref(), Some("u1"));
        assert_eq!(l.container.as_deref(), Some("main"));
        assert_eq!(
            l.pairs(),
            vec![
                ("region", "a.cache"),
                ("pod_uid", "u1"),
                ("container", "main")
            ]
        );
        let none = region_labels("/r.cache", None, &forged(), &LabelPolicy::default());
        assert_eq!(none.pairs(), vec![("region", "/r.cache")]);
    }

    #[test]
    fn identity_only_when_trusted_and_operator_labels_win() {
        let rel = Path::new("u1_main/a.cache");
        let trust = LabelPolicy {
            from_region_identity: true,
            ..LabelPolicy::default()
        };
        let l = region_labels("x", Some(rel), &forged(), &trust);
        assert_eq!(l.namespace.as_deref(), Some("kube-system"));
        assert_eq!(l.pod.as_deref(), Some("victim-0"));
        assert_eq!(
            l.pod_uid.as_deref(),
            Some("u1"),
            "the UID still comes from the directory"
        );
        assert_eq!(l.container.as_deref(), Some("main"), "empty header field");
        let fixed = LabelPolicy {
            from_region_identity: true,
            namespace: Some("ml".into()),
            pod: Some("trainer-0".into()),
            container: Some(String::new()),
        };
        let l = region_labels("x", Some(rel), &forged(), &fixed);
        assert_eq!(l.namespace.as_deref(), Some("ml"));
        assert_eq!(l.pod.as_deref(), Some("trainer-0"));
        assert_eq!(l.container.as_deref(), Some("main"));
    }
}
