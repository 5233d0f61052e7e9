//! The parts of a pod the mutation reads, and nothing else.
//!
//! The server reads each review's pod straight into this view: serde skips every field the view
//! does not name without building it, and an environment list keeps only its length and its
//! `LD_LIBRARY_PATH`, so a pod with thousands of variables costs little more than a small one.
//! [`PodView::from`] builds the same view from a k8s-openapi [`Pod`] for `inject` and the tests.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Container, Pod};
use serde::Deserialize;
use serde::de::{self, IgnoredAny, SeqAccess, Visitor};

/// A pod as the mutation sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PodView {
    #[serde(default)]
    pub metadata: MetaView,
    #[serde(default)]
    pub spec: Option<SpecView>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetaView {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub generate_name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecView {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub containers: Vec<ContainerView>,
    #[serde(default)]
    pub init_containers: Option<Vec<ContainerView>>,
    #[serde(default)]
    pub volumes: Option<Vec<Named>>,
    /// Read for their volume mounts only (a pod is created without them; checked all the same).
    #[serde(default)]
    pub ephemeral_containers: Option<Vec<ContainerView>>,
    #[serde(default)]
    pub node_selector: Option<BTreeMap<String, String>>,
}

/// Anything identified by its name (a volume).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Named {
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView {
    pub name: String,
    #[serde(default)]
    pub resources: Option<ResourcesView>,
    #[serde(default)]
    pub volume_mounts: Option<Vec<MountView>>,
    #[serde(default)]
    pub env: Option<EnvView>,
}

/// Requests and limits by resource name (quantities as written).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ResourcesView {
    #[serde(default, deserialize_with = "quantities")]
    pub requests: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "quantities")]
    pub limits: Option<BTreeMap<String, String>>,
}

/// Quantities as text: the API server sends strings, but a manifest may say `nvidia.com/gpu: 1`.
fn quantities<'de, D: de::Deserializer<'de>>(deserializer: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    let map = Option::<BTreeMap<String, QuantityText>>::deserialize(deserializer)?;
    Ok(map.map(|m| m.into_iter().map(|(k, v)| (k, v.0)).collect()))
}

struct QuantityText(String);

impl<'de> Deserialize<'de> for QuantityText {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct QuantityVisitor;
        impl Visitor<'_> for QuantityVisitor {
            type Value = QuantityText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a quantity (a string or a number)")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<QuantityText, E> {
                Ok(QuantityText(text.to_owned()))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<QuantityText, E> {
                Ok(QuantityText(text))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<QuantityText, E> {
                Ok(QuantityText(n.to_string()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<QuantityText, E> {
                Ok(QuantityText(n.to_string()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<QuantityText, E> {
                Ok(QuantityText(n.to_string()))
            }
        }
        deserializer.deserialize_any(QuantityVisitor)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountView {
    /// The volume mounted.
    #[serde(default)]
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: Option<bool>,
}

/// A container's `env` list: its length and its last `LD_LIBRARY_PATH` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvView {
    pub len: usize,
    pub library_path: Option<LibraryPath>,
}

/// The `LD_LIBRARY_PATH` entry of an `env` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LibraryPath {
    pub index: usize,
    pub value: Option<String>,
    /// Set from a reference (`valueFrom`) rather than a value.
    pub from_reference: bool,
}

const LIBRARY_PATH: &str = "LD_LIBRARY_PATH";

fn null_as_empty<'de, D: de::Deserializer<'de>>(deserializer: D) -> Result<Vec<ContainerView>, D::Error> {
    Ok(Option::<Vec<ContainerView>>::deserialize(deserializer)?.unwrap_or_default())
}

impl<'de> Deserialize<'de> for EnvView {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(EnvVisitor)
    }
}

struct EnvVisitor;

impl<'de> Visitor<'de> for EnvVisitor {
    type Value = EnvView;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of environment variables")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<EnvView, A::Error> {
        let mut view = EnvView::default();
        while let Some(var) = items.next_element::<EnvEntry>()? {
            if var.library_path.0 {
                view.library_path =
                    Some(LibraryPath { index: view.len, value: var.value, from_reference: var.value_from.is_some() });
            }
            view.len += 1;
        }
        Ok(view)
    }
}

/// One variable: whether it is `LD_LIBRARY_PATH` (its name is compared, not kept), its value,
/// and whether it has a `valueFrom`. Other fields are skipped unread.
#[derive(Deserialize)]
struct EnvEntry {
    #[serde(rename = "name")]
    library_path: IsLibraryPath,
    #[serde(default)]
    value: Option<String>,
    #[serde(default, rename = "valueFrom")]
    value_from: Option<IgnoredAny>,
}

/// Whether a string is `LD_LIBRARY_PATH`, read without keeping it.
struct IsLibraryPath(bool);

impl<'de> Deserialize<'de> for IsLibraryPath {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl Visitor<'_> for NameVisitor {
            type Value = IsLibraryPath;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a variable name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<IsLibraryPath, E> {
                Ok(IsLibraryPath(name == LIBRARY_PATH))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

impl From<&Pod> for PodView {
    fn from(pod: &Pod) -> Self {
        let metadata = &pod.metadata;
        Self {
            metadata: MetaView {
                name: metadata.name.clone(),
                generate_name: metadata.generate_name.clone(),
                namespace: metadata.namespace.clone(),
                annotations: metadata.annotations.clone(),
            },
            spec: pod.spec.as_ref().map(|spec| SpecView {
                containers: spec.containers.iter().map(ContainerView::from).collect(),
                init_containers: spec.init_containers.as_ref().map(|c| c.iter().map(ContainerView::from).collect()),
                volumes: spec.volumes.as_ref().map(|v| v.iter().map(|v| Named { name: v.name.clone() }).collect()),
                node_selector: spec.node_selector.clone(),
                ephemeral_containers: spec.ephemeral_containers.as_ref().map(|list| {
                    list.iter()
                        .map(|e| {
                            ContainerView::from(&Container {
                                name: e.name.clone(),
                                resources: e.resources.clone(),
                                volume_mounts: e.volume_mounts.clone(),
                                env: e.env.clone(),
                                ..Container::default()
                            })
                        })
                        .collect()
                }),
            }),
        }
    }
}

impl From<&Container> for ContainerView {
    fn from(container: &Container) -> Self {
        let quantities = |map: &Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>| {
            map.as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        };
        Self {
            name: container.name.clone(),
            resources: container
                .resources
                .as_ref()
                .map(|r| ResourcesView { requests: quantities(&r.requests), limits: quantities(&r.limits) }),
            volume_mounts: container.volume_mounts.as_ref().map(|m| {
                m.iter()
                    .map(|m| MountView {
                        name: m.name.clone(),
                        mount_path: m.mount_path.clone(),
                        read_only: m.read_only,
                    })
                    .collect()
            }),
            env: container.env.as_ref().map(|env| EnvView {
                len: env.len(),
                library_path: env.iter().rposition(|e| e.name == LIBRARY_PATH).map(|index| LibraryPath {
                    index,
                    value: env[index].value.clone(),
                    from_reference: env[index].value_from.is_some(),
                }),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_view_read_from_json_equals_the_view_of_the_typed_pod() {
        let raw = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "train-", "annotations": {"a/b": "c"}, "managedFields": [{"manager": "x"}]},
            "spec": {
                "containers": [{
                    "name": "cuda", "image": "img",
                    "resources": {"limits": {"nvidia.com/gpu": "1", "cpu": "2"}, "requests": {"cpu": "2"}},
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    "env": [
                        {"name": "LD_LIBRARY_PATH", "value": "/first"},
                        {"name": "A", "value": "1"},
                        {"name": "LD_LIBRARY_PATH", "valueFrom": {"configMapKeyRef": {"name": "m", "key": "k"}}},
                        {"name": "B"}
                    ]
                }],
                "initContainers": [{"name": "setup", "env": []}],
                "volumes": [{"name": "data", "emptyDir": {}}]
            }
        });
        let view: PodView = serde_json::from_value(raw.clone()).expect("view");
        let pod: Pod = serde_json::from_value(raw).expect("pod");
        assert_eq!(view, PodView::from(&pod));
        let env = view.spec.as_ref().and_then(|s| s.containers[0].env.clone()).expect("env");
        assert_eq!(env.len, 4);
        assert_eq!(env.library_path, Some(LibraryPath { index: 2, value: None, from_reference: true }));
    }

    #[test]
    fn quantities_written_as_numbers_read_as_the_typed_pod_reads_them() {
        let raw = json!({"spec": {"containers": [{"name": "c", "resources": {
            "limits": {"nvidia.com/gpu": 1, "cpu": 0.5, "memory": "1Gi"}, "requests": {"cpu": "500m"}}}]}});
        let view: PodView = serde_json::from_value(raw.clone()).expect("view");
        let pod: Pod = serde_json::from_value(raw).expect("pod");
        assert_eq!(view, PodView::from(&pod));
        let limits =
            view.spec.expect("spec").containers[0].resources.clone().expect("resources").limits.expect("limits");
        assert_eq!(limits["nvidia.com/gpu"], "1");
    }

    #[test]
    fn a_misshapen_field_the_view_reads_is_an_error() {
        let error = serde_json::from_value::<PodView>(json!({"spec": {"containers": "trainer"}})).expect_err("shape");
        assert!(error.to_string().contains("expected a sequence"), "{error}");
        let error = serde_json::from_value::<PodView>(
            json!({"spec": {"containers": [{"name": "c", "env": [{"value": "1"}]}]}}),
        )
        .expect_err("env without a name");
        assert!(error.to_string().contains("missing field `name`"), "{error}");
    }
}
