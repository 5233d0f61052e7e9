//! The bundle in its one Secret (the single source of truth every replica reads) and the CA in
//! the MutatingWebhookConfiguration's `caBundle`. Writes use the Secret's resourceVersion, so two
//! replicas racing never end with different CAs: the loser re-reads and adopts the winner's.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::{Bundle, Lifetimes, Verdict, generate, judge, renew_leaf};

/// Which objects hold the certificate.
#[derive(Debug, Clone)]
pub struct Target {
    pub namespace: String,
    pub secret: String,
    pub service: String,
    pub webhook_config: String,
    pub lifetimes: Lifetimes,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {kind} {namespace}/{name}: {source}")]
    Api { action: &'static str, kind: &'static str, namespace: String, name: String, source: kube::Error },
    #[error(transparent)]
    Certificate(#[from] crate::Error),
    #[error("Secret {namespace}/{name} kept changing under us; giving up this round")]
    Contended { namespace: String, name: String },
}

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const CERT: &str = "tls.crt";
const KEY: &str = "tls.key";

/// The bundle a Secret holds, if it holds one.
pub fn from_secret(secret: &Secret) -> Option<Bundle> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| data.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok());
    Some(Bundle { ca_cert: text(CA_CERT)?, ca_key: text(CA_KEY)?, cert: text(CERT)?, key: text(KEY)? })
}

/// A `kubernetes.io/tls` Secret holding the bundle (the CA key stays beside it, in the same
/// Secret, readable only by the webhook's ServiceAccount).
pub fn to_secret(target: &Target, bundle: &Bundle, resource_version: Option<String>) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(target.secret.clone()),
            namespace: Some(target.namespace.clone()),
            resource_version,
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/component".to_owned(),
                "webhook-certificate".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (CA_CERT.to_owned(), bytes(&bundle.ca_cert)),
            (CA_KEY.to_owned(), bytes(&bundle.ca_key)),
            (CERT.to_owned(), bytes(&bundle.cert)),
            (KEY.to_owned(), bytes(&bundle.key)),
        ])),
        ..Secret::default()
    }
}

/// What to write, given what the Secret holds now.
pub fn next(
    existing: Option<&Bundle>,
    names: &[String],
    lifetimes: Lifetimes,
    now: OffsetDateTime,
) -> crate::Result<Option<Bundle>> {
    match existing.map(|b| (b, judge(b, names, lifetimes, now))) {
        Some((_, Verdict::Keep)) => Ok(None),
        Some((bundle, Verdict::RenewLeaf)) => renew_leaf(bundle, names, lifetimes).map(Some),
        Some((_, Verdict::Regenerate)) | None => generate(names, lifetimes).map(Some),
    }
}

/// The JSON patch that puts `ca_pem` into every webhook of `config` served by `service`, or
/// `None` when they all have it already.
pub fn ca_bundle_patch(
    config: &MutatingWebhookConfiguration,
    service: &str,
    ca_pem: &str,
) -> Option<serde_json::Value> {
    let want = ByteString(ca_pem.as_bytes().to_vec());
    let ops: Vec<serde_json::Value> = config
        .webhooks
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, w)| w.client_config.service.as_ref().is_some_and(|s| s.name == service))
        .filter(|(_, w)| w.client_config.ca_bundle.as_ref() != Some(&want))
        .map(|(i, _)| json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": want}))
        .collect();
    (!ops.is_empty()).then_some(serde_json::Value::Array(ops))
}

/// Make sure the Secret holds a valid bundle for the Service and the webhook trusts its CA.
pub async fn ensure(client: &kube::Client, target: &Target) -> Result<Bundle, StoreError> {
    let names = crate::service_dns_names(&target.service, &target.namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &target.namespace);
    let api_error = |action, kind, name: &str, source| StoreError::Api {
        action,
        kind,
        namespace: target.namespace.clone(),
        name: name.to_owned(),
        source,
    };
    let mut bundle = None;
    for _ in 0..5 {
        let current =
            secrets.get_opt(&target.secret).await.map_err(|e| api_error("reading", "Secret", &target.secret, e))?;
        let existing = current.as_ref().and_then(from_secret);
        match next(existing.as_ref(), &names, target.lifetimes, OffsetDateTime::now_utc())? {
            None => {
                bundle = existing;
                break;
            }
            Some(fresh) => {
                let result = match &current {
                    None => secrets.create(&PostParams::default(), &to_secret(target, &fresh, None)).await,
                    Some(secret) => {
                        let version = secret.metadata.resource_version.clone();
                        secrets
                            .replace(&target.secret, &PostParams::default(), &to_secret(target, &fresh, version))
                            .await
                    }
                };
                match result {
                    Ok(_) => {
                        info!(secret = %target.secret, names = ?names, "serving certificate written");
                        bundle = Some(fresh);
                        break;
                    }
                    // Another replica got there first: read what it wrote.
                    Err(kube::Error::Api(status)) if status.code == 409 => continue,
                    Err(e) => return Err(api_error("writing", "Secret", &target.secret, e)),
                }
            }
        }
    }
    let bundle = bundle
        .ok_or_else(|| StoreError::Contended { namespace: target.namespace.clone(), name: target.secret.clone() })?;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = configs
        .get(&target.webhook_config)
        .await
        .map_err(|e| api_error("reading", "MutatingWebhookConfiguration", &target.webhook_config, e))?;
    if let Some(patch) = ca_bundle_patch(&config, &target.service, &bundle.ca_cert) {
        let patch: json_patch::Patch =
            serde_json::from_value(patch).map_err(|e| crate::Error::Parse { what: "patch", reason: e.to_string() })?;
        configs
            .patch(&target.webhook_config, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
            .map_err(|e| api_error("patching", "MutatingWebhookConfiguration", &target.webhook_config, e))?;
        info!(config = %target.webhook_config, "caBundle updated");
    }
    Ok(bundle)
}

/// Keep ensuring at `interval`; errors are logged and retried.
pub async fn watch(client: &kube::Client, target: &Target, interval: Duration) {
    loop {
        if let Err(error) = ensure(client, target).await {
            warn!(%error, "certificate check failed; retrying");
            tokio::time::sleep(Duration::from_secs(10)).await;
            continue;
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, ServiceReference, WebhookClientConfig};

    fn target() -> Target {
        Target {
            namespace: "kube-system".into(),
            secret: "nvidia-webhook-tls".into(),
            service: "nvidia-webhook".into(),
            webhook_config: "nvidia-installer".into(),
            lifetimes: Lifetimes::default(),
        }
    }

    #[test]
    fn secret_round_trip() {
        let names = crate::service_dns_names("nvidia-webhook", "kube-system");
        let bundle = generate(&names, Lifetimes::default()).expect("generate");
        let secret = to_secret(&target(), &bundle, Some("42".into()));
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(from_secret(&secret), Some(bundle.clone()));
        assert_eq!(
            next(Some(&bundle), &names, Lifetimes::default(), OffsetDateTime::now_utc()).expect("next"),
            None,
            "a good bundle is kept"
        );
        let renewed = next(
            Some(&bundle),
            &crate::service_dns_names("other", "ns"),
            Lifetimes::default(),
            OffsetDateTime::now_utc(),
        )
        .expect("next")
        .expect("renewed");
        assert_eq!(renewed.ca_cert, bundle.ca_cert, "renewal keeps the CA (and the caBundle)");
        assert!(next(None, &names, Lifetimes::default(), OffsetDateTime::now_utc()).expect("next").is_some());
    }

    #[test]
    fn ca_bundle_patch_touches_only_our_webhooks_and_only_when_needed() {
        let hook = |service: &str, ca: Option<&str>| MutatingWebhook {
            name: format!("{service}.example.com"),
            client_config: WebhookClientConfig {
                service: Some(ServiceReference {
                    name: service.into(),
                    namespace: "kube-system".into(),
                    ..Default::default()
                }),
                ca_bundle: ca.map(|c| ByteString(c.as_bytes().to_vec())),
                ..Default::default()
            },
            ..Default::default()
        };
        let config = MutatingWebhookConfiguration {
            webhooks: Some(vec![
                hook("other", None),
                hook("nvidia-webhook", None),
                hook("nvidia-webhook", Some("OLD")),
            ]),
            ..Default::default()
        };
        let patch = ca_bundle_patch(&config, "nvidia-webhook", "NEW").expect("patch");
        let ops = patch.as_array().expect("ops");
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0]["path"], "/webhooks/1/clientConfig/caBundle");
        assert_eq!(ops[1]["path"], "/webhooks/2/clientConfig/caBundle");
        // ByteString serializes as base64, as the API expects.
        assert_eq!(ops[0]["value"], "TkVX");
        let done = MutatingWebhookConfiguration {
            webhooks: Some(vec![hook("nvidia-webhook", Some("NEW"))]),
            ..Default::default()
        };
        assert!(ca_bundle_patch(&done, "nvidia-webhook", "NEW").is_none());
    }
}
