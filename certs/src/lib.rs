//! The webhook's serving certificate: one CA (the single source of truth, stored in one Secret and
//! patched into the webhook configuration's `caBundle`) and an ECDSA P-256 leaf for the Service's
//! DNS names. This module makes and judges certificates; storing them is the caller's business.

pub mod store;

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating a certificate for {names:?}: {source}")]
    Generate { names: Vec<String>, source: rcgen::Error },
    #[error("reading the {what} PEM: {reason}")]
    Parse { what: &'static str, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A CA and a leaf it signed, all PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub ca_cert: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

/// How long certificates live and when they are renewed.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub ca: Duration,
    pub leaf: Duration,
    /// Renew when less than this is left.
    pub renew_before: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            ca: Duration::from_secs(10 * 365 * DAY),
            leaf: Duration::from_secs(365 * DAY),
            renew_before: Duration::from_secs(30 * DAY),
        }
    }
}

/// The DNS names a webhook Service answers to inside the cluster.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

fn params(names: &[String], lifetime: Duration, common_name: &str) -> Result<CertificateParams> {
    let mut params =
        CertificateParams::new(names.to_vec()).map_err(|source| Error::Generate { names: names.to_vec(), source })?;
    let now = OffsetDateTime::now_utc();
    // Tolerate clocks a little behind ours.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    Ok(params)
}

fn key(names: &[String]) -> Result<KeyPair> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| Error::Generate { names: names.to_vec(), source })
}

/// A new CA and a leaf for `names`.
pub fn generate(names: &[String], lifetimes: Lifetimes) -> Result<Bundle> {
    let fail = |source| Error::Generate { names: names.to_vec(), source };
    let mut ca_params = params(&[], lifetimes.ca, "nvidia-installer webhook CA")?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = key(names)?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(fail)?;
    let (cert, key) = leaf(names, lifetimes, &ca)?;
    Ok(Bundle { ca_cert: ca.pem(), ca_key: ca_key_pem, cert, key })
}

/// A new leaf for `names`, signed by the CA of `bundle` (kept, so the `caBundle` stays valid).
pub fn renew_leaf(bundle: &Bundle, names: &[String], lifetimes: Lifetimes) -> Result<Bundle> {
    let ca_key =
        KeyPair::from_pem(&bundle.ca_key).map_err(|e| Error::Parse { what: "CA key", reason: e.to_string() })?;
    let issuer = Issuer::from_ca_cert_pem(&bundle.ca_cert, ca_key)
        .map_err(|e| Error::Parse { what: "CA certificate", reason: e.to_string() })?;
    let (cert, key) = leaf(names, lifetimes, &issuer)?;
    Ok(Bundle { cert, key, ..bundle.clone() })
}

fn leaf(
    names: &[String],
    lifetimes: Lifetimes,
    issuer: &Issuer<'_, impl rcgen::SigningKey>,
) -> Result<(String, String)> {
    let mut params = params(names, lifetimes.leaf, names.first().map_or("nvidia-webhook", String::as_str))?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = key(names)?;
    let cert = params.signed_by(&key, issuer).map_err(|source| Error::Generate { names: names.to_vec(), source })?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// What a stored bundle needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid for the names and not near expiry.
    Keep,
    /// The leaf expires soon or names other hosts: issue a new leaf from the same CA.
    RenewLeaf,
    /// The CA itself is unreadable or expires soon: start over (the caBundle changes).
    Regenerate,
}

/// Decide what `bundle` needs to serve `names` at time `now`.
pub fn judge(bundle: &Bundle, names: &[String], lifetimes: Lifetimes, now: OffsetDateTime) -> Verdict {
    let renew_before = time::Duration::seconds(i64::try_from(lifetimes.renew_before.as_secs()).unwrap_or(0));
    let Ok(ca) = read(&bundle.ca_cert) else { return Verdict::Regenerate };
    if ca.not_after - renew_before <= now || KeyPair::from_pem(&bundle.ca_key).is_err() {
        return Verdict::Regenerate;
    }
    let Ok(leaf) = read(&bundle.cert) else { return Verdict::RenewLeaf };
    let mut have = leaf.names.clone();
    let mut want = names.to_vec();
    have.sort();
    want.sort();
    if have != want
        || leaf.not_after - renew_before <= now
        || leaf.issuer != ca.subject
        || KeyPair::from_pem(&bundle.key).is_err()
    {
        return Verdict::RenewLeaf;
    }
    Verdict::Keep
}

/// The parts of a certificate the verdict looks at.
#[derive(Debug, Clone)]
pub struct Summary {
    pub not_after: OffsetDateTime,
    pub names: Vec<String>,
    pub subject: String,
    pub issuer: String,
}

/// Read the first certificate of a PEM text.
pub fn read(pem: &str) -> Result<Summary> {
    let parse = |reason: String| Error::Parse { what: "certificate", reason };
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| parse(e.to_string()))?;
    let cert = block.parse_x509().map_err(|e| parse(e.to_string()))?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Summary {
        not_after: cert.validity().not_after.to_datetime(),
        names,
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        service_dns_names("nvidia-webhook", "kube-system")
    }

    #[test]
    fn fresh_bundle_is_kept_and_names_match() {
        let bundle = generate(&names(), Lifetimes::default()).expect("generate");
        assert_eq!(judge(&bundle, &names(), Lifetimes::default(), OffsetDateTime::now_utc()), Verdict::Keep);
        let leaf = read(&bundle.cert).expect("leaf");
        assert!(leaf.names.contains(&"nvidia-webhook.kube-system.svc".to_owned()));
        assert_eq!(leaf.issuer, read(&bundle.ca_cert).expect("ca").subject);
    }

    #[test]
    fn changed_names_or_near_expiry_renew_the_leaf_and_keep_the_ca() {
        let lifetimes = Lifetimes::default();
        let bundle = generate(&names(), lifetimes).expect("generate");
        let other = service_dns_names("renamed", "kube-system");
        assert_eq!(judge(&bundle, &other, lifetimes, OffsetDateTime::now_utc()), Verdict::RenewLeaf);
        let later = OffsetDateTime::now_utc() + time::Duration::days(340);
        assert_eq!(judge(&bundle, &names(), lifetimes, later), Verdict::RenewLeaf);
        let renewed = renew_leaf(&bundle, &other, lifetimes).expect("renew");
        assert_eq!(renewed.ca_cert, bundle.ca_cert);
        assert_ne!(renewed.cert, bundle.cert);
        assert_eq!(judge(&renewed, &other, lifetimes, OffsetDateTime::now_utc()), Verdict::Keep);
    }

    #[test]
    fn an_expiring_or_broken_ca_regenerates() {
        let lifetimes = Lifetimes::default();
        let bundle = generate(&names(), lifetimes).expect("generate");
        let much_later = OffsetDateTime::now_utc() + time::Duration::days(3640);
        assert_eq!(judge(&bundle, &names(), lifetimes, much_later), Verdict::Regenerate);
        let broken = Bundle { ca_cert: "garbage".into(), ..bundle };
        assert_eq!(judge(&broken, &names(), lifetimes, OffsetDateTime::now_utc()), Verdict::Regenerate);
    }
}
