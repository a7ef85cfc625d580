//! The workload that owns what a process creates in Kubernetes: the controller's RelaySyncs
//! and leader Lease belong to its Deployment, a worker's Lease to the workers' StatefulSet.
//! With an owner reference on each, deleting the workload (`helm uninstall`) has the
//! garbage collector delete them too, instead of leaving them behind.

use std::fmt;
use std::str::FromStr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

/// A workload kind that may own what grasp-sync creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerKind {
    Deployment,
    StatefulSet,
}

impl OwnerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OwnerKind::Deployment => "Deployment",
            OwnerKind::StatefulSet => "StatefulSet",
        }
    }
}

/// `deployment/<name>` or `statefulset/<name>`, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerTarget {
    pub kind: OwnerKind,
    pub name: String,
}

impl fmt::Display for OwnerTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.as_str().to_lowercase(), self.name)
    }
}

impl FromStr for OwnerTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, name) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected deployment/<name> or statefulset/<name>"))?;
        let kind = match kind.to_ascii_lowercase().as_str() {
            "deployment" | "deployments" | "deploy" => OwnerKind::Deployment,
            "statefulset" | "statefulsets" | "sts" => OwnerKind::StatefulSet,
            other => {
                return Err(format!(
                    "{other:?}: the owner must be a deployment or a statefulset"
                ));
            }
        };
        if !super::naming::is_dns1123_subdomain(name) {
            return Err(format!("{name:?} is not a Kubernetes object name"));
        }
        Ok(OwnerTarget {
            kind,
            name: name.to_string(),
        })
    }
}

impl OwnerTarget {
    /// The reference to put on owned objects, for the workload's `uid` as read from the API
    /// server. Not a controller reference (nothing reconciles them on the owner's behalf),
    /// and no `blockOwnerDeletion` (which needs rights on the owner's finalizers).
    pub fn reference(&self, uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".to_string(),
            kind: self.kind.as_str().to_string(),
            name: self.name.clone(),
            uid: uid.to_string(),
            controller: None,
            block_owner_deletion: None,
        }
    }
}

/// `refs` with `owner` among them (added once, by uid), keeping every other owner.
pub fn with_owner(
    refs: Option<Vec<OwnerReference>>,
    owner: &OwnerReference,
) -> Vec<OwnerReference> {
    let mut refs = refs.unwrap_or_default();
    if !refs.iter().any(|r| r.uid == owner.uid) {
        refs.push(owner.clone());
    }
    refs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_two_kinds_and_refuses_the_rest() {
        assert_eq!(
            "deployment/gs-grasp-sync-controller".parse::<OwnerTarget>(),
            Ok(OwnerTarget {
                kind: OwnerKind::Deployment,
                name: "gs-grasp-sync-controller".into()
            })
        );
        assert_eq!(
            "StatefulSet/gs-grasp-sync-worker"
                .parse::<OwnerTarget>()
                .map(|t| t.kind),
            Ok(OwnerKind::StatefulSet)
        );
        for bad in [
            "gs-grasp-sync-controller",
            "daemonset/x",
            "deployment/",
            "deployment/Upper",
            "deployment/a/b",
        ] {
            assert!(bad.parse::<OwnerTarget>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn the_reference_names_the_workload_and_is_added_once() {
        let t: OwnerTarget = "statefulset/gs-w".parse().unwrap();
        let r = t.reference("uid-1");
        assert_eq!(
            (r.api_version.as_str(), r.kind.as_str(), r.name.as_str()),
            ("apps/v1", "StatefulSet", "gs-w")
        );
        let other = OwnerReference {
            uid: "uid-0".into(),
            ..r.clone()
        };
        let refs = with_owner(Some(vec![other.clone()]), &r);
        assert_eq!(refs, vec![other, r.clone()]);
        assert_eq!(with_owner(Some(refs.clone()), &r), refs);
    }
}
