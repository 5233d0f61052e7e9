//! Signatures of bundle manifests, in the format of OpenBSD's `signify` (packaged in Debian as
//! `signify-openbsd`), so that anyone can check a bundle by hand:
//!
//! ```sh
//! signify-openbsd -V -p nvidia-bundles.pub -m nvidia-535.261.03.tar.zst.manifest.json \
//!     -x nvidia-535.261.03.tar.zst.manifest.json.sig
//! ```
//!
//! Ed25519 over the manifest's bytes exactly as stored in the bucket; the manifest pins the
//! archive's digest and every file's. Keys carry an 8-byte key number, which names them in
//! messages. Secret keys must be unencrypted (`signify-openbsd -G -n`): they live in a Secret that
//! only the compiler instance's `modulus` container mounts.

use base64::Engine as _;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use sha2::{Digest, Sha512};

use crate::{Error, Result};

/// The signature object of a manifest key.
pub fn key_of(manifest_key: &str) -> String {
    format!("{manifest_key}.sig")
}

/// A key's number, as hex (how messages and `status` name a key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// The base64 payload of a signify file: the line after `untrusted comment: …`, or a bare line.
fn payload(text: &str, what: &str) -> std::result::Result<Vec<u8>, String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().ok_or_else(|| format!("empty {what}"))?;
    let line = if first.starts_with("untrusted comment:") {
        lines.next().ok_or_else(|| format!("{what}: nothing after the comment line"))?
    } else {
        first
    };
    base64::engine::general_purpose::STANDARD.decode(line).map_err(|e| format!("{what}: not base64: {e}"))
}

fn key_number(bytes: &[u8]) -> KeyId {
    let mut number = [0u8; 8];
    number.copy_from_slice(&bytes[..8]);
    KeyId(number)
}

/// A public key (`signify -G` writes it to `<name>.pub`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub id: KeyId,
    key: [u8; 32],
}

impl PublicKey {
    /// From a `.pub` file's text or its base64 line alone.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let bytes = payload(text, "public key")?;
        if bytes.len() != 42 || &bytes[..2] != b"Ed" {
            return Err(format!("not a signify Ed25519 public key ({} bytes)", bytes.len()));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes[10..]);
        Ok(Self { id: key_number(&bytes[2..10]), key })
    }
}

/// A secret key (`signify -G -n` writes it to `<name>.sec`, unencrypted).
pub struct SecretKey {
    pub id: KeyId,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl SecretKey {
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let bytes = payload(text, "secret key")?;
        // "Ed" "BK" rounds(4) salt(16) checksum(8) keynum(8) seckey(64)
        if bytes.len() != 104 || &bytes[..4] != b"EdBK" {
            return Err(format!("not a signify Ed25519 secret key ({} bytes)", bytes.len()));
        }
        if bytes[4..8] != [0, 0, 0, 0] {
            return Err("the secret key is encrypted with a passphrase: generate an unencrypted one (signify-openbsd -G -n) and keep it in a Secret".to_owned());
        }
        let (checksum, seckey) = (&bytes[24..32], &bytes[40..104]);
        if Sha512::digest(seckey)[..8] != *checksum {
            return Err("the secret key's checksum does not match: the file is damaged".to_owned());
        }
        let pair = Ed25519KeyPair::from_seed_and_public_key(&seckey[..32], &seckey[32..])
            .map_err(|e| format!("the secret key is not a valid Ed25519 key: {e}"))?;
        Ok(Self { id: key_number(&bytes[32..40]), pair })
    }

    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading the signing key", path, e))?;
        Self::parse(&text).map_err(|reason| Error::Signature { what: path.display().to_string(), reason })
    }

    /// The public half, as a `.pub` file would hold it.
    pub fn public(&self) -> PublicKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey { id: self.id, key }
    }

    /// A signature file for `message`.
    pub fn sign(&self, message: &[u8], comment: &str) -> String {
        let mut bytes = b"Ed".to_vec();
        bytes.extend_from_slice(&self.id.0);
        bytes.extend_from_slice(self.pair.sign(message).as_ref());
        format!("untrusted comment: {comment}\n{}\n", base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

/// Check a signature file over `message` against the trusted keys; the key that signed it.
pub fn verify(trusted: &[PublicKey], signature: &str, message: &[u8]) -> std::result::Result<KeyId, String> {
    let bytes = payload(signature, "signature")?;
    if bytes.len() != 74 || &bytes[..2] != b"Ed" {
        return Err(format!("not a signify Ed25519 signature ({} bytes)", bytes.len()));
    }
    let id = key_number(&bytes[2..10]);
    let key = trusted.iter().find(|k| k.id == id).ok_or_else(|| {
        let known: Vec<String> = trusted.iter().map(|k| k.id.to_string()).collect();
        format!("signed by key {id}, which is not trusted (trusted: {})", known.join(", "))
    })?;
    UnparsedPublicKey::new(&ED25519, key.key).verify(message, &bytes[10..]).map_err(|_| {
        format!("the signature by key {id} does not match: the manifest was changed after it was signed")
    })?;
    Ok(id)
}

/// The key number a signature file names, without checking it.
pub fn signer(signature: &str) -> Option<KeyId> {
    let bytes = payload(signature, "signature").ok()?;
    (bytes.len() == 74).then(|| key_number(&bytes[2..10]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret key file as `signify -G -n` writes it, from a fixed seed.
    pub(crate) fn secret_key_text(seed: [u8; 32], number: [u8; 8]) -> String {
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).expect("seed");
        let mut seckey = seed.to_vec();
        seckey.extend_from_slice(pair.public_key().as_ref());
        let mut bytes = b"EdBK".to_vec();
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&[7; 16]);
        bytes.extend_from_slice(&Sha512::digest(&seckey)[..8]);
        bytes.extend_from_slice(&number);
        bytes.extend_from_slice(&seckey);
        format!("untrusted comment: test secret key\n{}\n", base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    #[test]
    fn signs_and_verifies_and_names_keys() {
        let key = SecretKey::parse(&secret_key_text([1; 32], [0xab; 8])).expect("key");
        let other = SecretKey::parse(&secret_key_text([2; 32], [0xcd; 8])).expect("key");
        let signature = key.sign(b"manifest", "signed by test");
        assert_eq!(verify(&[other.public(), key.public()], &signature, b"manifest"), Ok(key.id));
        assert_eq!(signer(&signature), Some(key.id));
        let error = verify(&[other.public()], &signature, b"manifest").expect_err("untrusted");
        assert!(error.contains("abababababababab") && error.contains("not trusted"), "{error}");
        let error = verify(&[key.public()], &signature, b"manifesT").expect_err("changed");
        assert!(error.contains("changed after it was signed"), "{error}");
        assert!(verify(&[key.public()], "untrusted comment: x\nnot base64!\n", b"m").is_err());
    }

    #[test]
    fn encrypted_or_damaged_secret_keys_are_refused_clearly() {
        let text = secret_key_text([1; 32], [1; 8]);
        let mut bytes = payload(&text, "k").expect("payload");
        bytes[7] = 42;
        let encrypted = base64::engine::general_purpose::STANDARD.encode(&bytes);
        assert!(SecretKey::parse(&encrypted).expect_err("encrypted").contains("-G -n"));
        bytes[7] = 0;
        bytes[100] ^= 1;
        let damaged = base64::engine::general_purpose::STANDARD.encode(&bytes);
        assert!(SecretKey::parse(&damaged).expect_err("damaged").contains("checksum"));
    }
}
