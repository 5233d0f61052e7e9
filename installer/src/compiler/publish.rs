//! `publish`: upload a bundle and then its manifest, so readers never see a manifest without its
//! archive. Needs only s3:PutObject, s3:GetObject and s3:ListBucket.

use std::path::Path;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use base64::Engine as _;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tracing::info;

use crate::bundle::manifest::Manifest;
use crate::bundle::signature::{self, SecretKey};
use crate::s3::{self, Bucket, BundleKeys, Transfer};
use crate::{Error, Result};

/// Objects above this size are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 32 << 20;
const PART_SIZE: u64 = 16 << 20;
/// What a key keeps unencoded in `x-amz-copy-source` (a kernel release's `+` does not).
const KEY_IN_URL: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'/').remove(b'-').remove(b'.').remove(b'_').remove(b'~');
/// The largest manifest read back from the bucket.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone)]
pub struct Published {
    pub archive_key: String,
    pub manifest_key: String,
    pub manifest: Manifest,
    /// The same bundle was already published: nothing was written.
    pub unchanged: bool,
}

/// Publish `bundle` (a `tar.zst` made by `pack`) for Garden Linux `gardenlinux`.
///
/// Everything is checked before the bucket changes: the whole archive as a node will check it,
/// the names that become keys, the Garden Linux version it was packed for. A refused publish
/// leaves the bucket as it was.
///
/// The bundle goes under its flavor's keys (`…/<kernel>/<flavor>/nvidia-<driver>.tar.zst`), so
/// that a bucket can hold both flavors of a driver, and under the plain keys too
/// (`…/<kernel>/nvidia-<driver>.tar.zst`, what they have always meant: the bundle of that
/// driver) unless those hold the other flavor. Each manifest is written after its archive.
pub async fn publish(
    bucket: &Bucket,
    bundle: &Path,
    gardenlinux: &str,
    force: bool,
    signing: Option<&SecretKey>,
    transfer: &Transfer,
) -> Result<Published> {
    let (client, bucket) = (&bucket.client, bucket.name.as_str());
    // The archive as a node will check it: every entry, every digest, before the bucket changes.
    let inner = crate::bundle::verify_packed(bundle)?;
    let plain = BundleKeys::new(gardenlinux, &inner.kernel_release, &inner.driver_version)?;
    let flavored = BundleKeys::flavored(gardenlinux, &inner.kernel_release, &inner.driver_version, &inner.flavor)?;
    if let Some(packed_for) = inner.gardenlinux_version.as_deref().filter(|v| *v != gardenlinux) {
        return Err(Error::Manifest {
            source_name: bundle.display().to_string(),
            reason: format!("was packed for Garden Linux {packed_for}, not {gardenlinux}"),
        });
    }
    let (sha256, size) = digest(bundle)?;
    // The copy beside the archive is the archive's own manifest plus the archive's digest.
    let manifest = Manifest { archive: Some(crate::bundle::manifest::ArchiveEntry { sha256, size }), ..inner.clone() };
    // What is published, as stored: the bytes (compared and verified as they are) and, when they
    // read as a manifest, its flavor.
    let read = |key: String| async move { s3::get_small(client, bucket, &key, MAX_MANIFEST_BYTES, transfer).await };
    let published_flavor = read(flavored.manifest.clone()).await?;
    let published_plain = read(plain.manifest.clone()).await?;
    let flavor_of = |bytes: &Vec<u8>| Manifest::parse(bytes, "published").ok().map(|m| m.flavor);
    // The plain keys stay with the flavor that has them (an unreadable manifest there is kept too).
    let write_plain =
        published_plain.as_ref().is_none_or(|b| flavor_of(b).as_deref() == Some(manifest.flavor.as_str()));
    let ours = manifest.to_json();
    if !force {
        let same = |published: &Option<Vec<u8>>| published.as_deref() == Some(ours.as_slice());
        if same(&published_flavor) && (!write_plain || same(&published_plain)) {
            let keys = if write_plain { &plain } else { &flavored };
            let mut manifests = vec![&flavored.manifest];
            if write_plain {
                manifests.push(&plain.manifest);
            }
            let mut signed = true;
            for key in &manifests {
                // `same` found the stored bytes equal to ours.
                signed &= signed_with(client, bucket, key, &ours, signing, transfer).await?;
            }
            if signed {
                info!(bucket, key = %flavored.archive, "this very bundle is already published; nothing to do");
                return Ok(Published {
                    archive_key: keys.archive.clone(),
                    manifest_key: keys.manifest.clone(),
                    manifest,
                    unchanged: true,
                });
            }
            // The same bundle, not yet signed with this key: sign its manifests, keep the archives.
            for key in manifests {
                put_manifest(client, bucket, key, &manifest, signing).await?;
            }
            return Ok(Published {
                archive_key: keys.archive.clone(),
                manifest_key: keys.manifest.clone(),
                manifest,
                unchanged: false,
            });
        }
        for (published, keys) in [(&published_flavor, &flavored), (&published_plain, &plain)] {
            if published.is_some() && !same(published) && (keys == &flavored || write_plain) {
                return Err(Error::s3(
                    "PUT",
                    bucket,
                    &keys.manifest,
                    "already exists and describes another bundle; pass --force to replace it".to_owned(),
                ));
            }
        }
    }
    if force {
        // Take the manifests (and their signatures) away first: while the archives are replaced,
        // readers find nothing rather than an old manifest beside a new archive.
        let mut gone = vec![flavored.manifest.clone(), signature::key_of(&flavored.manifest)];
        if write_plain {
            gone.extend([plain.manifest.clone(), signature::key_of(&plain.manifest)]);
        }
        for key in &gone {
            client
                .delete_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| Error::s3("DELETE", bucket, key, e.to_string()))?;
        }
    }
    info!(bucket, key = %flavored.archive, bytes = size, "uploading the bundle");
    if size > MULTIPART_THRESHOLD {
        upload_multipart(client, bucket, &flavored.archive, bundle, size, transfer).await?;
    } else {
        let body = ByteStream::from_path(bundle)
            .await
            .map_err(|e| Error::s3("PUT", bucket, &flavored.archive, e.to_string()))?;
        client
            .put_object()
            .bucket(bucket)
            .key(&flavored.archive)
            .body(body)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(|e| Error::s3("PUT", bucket, &flavored.archive, e.to_string()))?;
    }
    put_manifest(client, bucket, &flavored.manifest, &manifest, signing).await?;
    if !write_plain {
        info!(bucket, key = %plain.manifest, flavor = %manifest.flavor, "the plain keys hold the other flavor; left as they are");
        return Ok(Published {
            archive_key: flavored.archive,
            manifest_key: flavored.manifest,
            manifest,
            unchanged: false,
        });
    }
    // The plain archive is a copy made by the store (no second upload).
    client
        .copy_object()
        .bucket(bucket)
        .key(&plain.archive)
        .copy_source(format!("{bucket}/{}", percent_encoding::utf8_percent_encode(&flavored.archive, KEY_IN_URL)))
        .send()
        .await
        .map_err(|e| Error::s3("COPY", bucket, &plain.archive, e.to_string()))?;
    put_manifest(client, bucket, &plain.manifest, &manifest, signing).await?;
    Ok(Published { archive_key: plain.archive, manifest_key: plain.manifest, manifest, unchanged: false })
}

/// Sign a manifest already in the bucket over its stored bytes (the archive stays).
pub async fn sign_published(bucket: &Bucket, key: &str, stored: &[u8], signing: &SecretKey) -> Result<()> {
    let signature_key = signature::key_of(key);
    let comment = format!("verify with signify-openbsd -V -p <key {}>.pub -m {key} -x {signature_key}", signing.id);
    bucket
        .client
        .put_object()
        .bucket(&bucket.name)
        .key(&signature_key)
        .content_type("text/plain")
        .body(ByteStream::from(signing.sign(stored, &comment).into_bytes()))
        .checksum_algorithm(ChecksumAlgorithm::Sha256)
        .send()
        .await
        .map_err(|e| Error::s3("PUT", &bucket.name, &signature_key, e.to_string()))?;
    info!(bucket = %bucket.name, key = %signature_key, signed_by = %signing.id, "published manifest signed");
    Ok(())
}

/// Whether the manifest at `key`, whose stored bytes the caller read, carries a signature by
/// `signing` over them (always, when not signing).
pub async fn signed_with(
    client: &Client,
    bucket: &str,
    key: &str,
    stored: &[u8],
    signing: Option<&SecretKey>,
    transfer: &Transfer,
) -> Result<bool> {
    let Some(signing) = signing else { return Ok(true) };
    let Some(bytes) = s3::get_small(client, bucket, &signature::key_of(key), 64 << 10, transfer).await? else {
        return Ok(false);
    };
    Ok(signature::verify(&[signing.public()], &String::from_utf8_lossy(&bytes), stored).is_ok())
}

/// Write a manifest, its signature first when signing: a reader that sees the manifest sees its
/// signature.
async fn put_manifest(
    client: &Client,
    bucket: &str,
    key: &str,
    manifest: &Manifest,
    signing: Option<&SecretKey>,
) -> Result<()> {
    let bytes = manifest.to_json();
    let signature_key = signature::key_of(key);
    if signing.is_none() && s3::head(client, bucket, &signature_key, &Transfer::default()).await?.is_some() {
        // An unsigned manifest must not meet the signature of an earlier one (only then is
        // s3:DeleteObject needed).
        client
            .delete_object()
            .bucket(bucket)
            .key(&signature_key)
            .send()
            .await
            .map_err(|e| Error::s3("DELETE", bucket, &signature_key, e.to_string()))?;
    }
    if let Some(signing) = signing {
        let comment = format!("verify with signify-openbsd -V -p <key {}>.pub -m {key} -x {signature_key}", signing.id);
        client
            .put_object()
            .bucket(bucket)
            .key(&signature_key)
            .content_type("text/plain")
            .body(ByteStream::from(signing.sign(&bytes, &comment).into_bytes()))
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(|e| Error::s3("PUT", bucket, &signature_key, e.to_string()))?;
        info!(bucket, key = %signature_key, signed_by = %signing.id, "manifest signed");
    }
    client
        .put_object()
        .bucket(bucket)
        .key(key)
        .content_type("application/json")
        .body(ByteStream::from(bytes))
        .checksum_algorithm(ChecksumAlgorithm::Sha256)
        .send()
        .await
        .map_err(|e| Error::s3("PUT", bucket, key, e.to_string()))?;
    info!(bucket, key, "manifest published");
    Ok(())
}

fn digest(path: &Path) -> Result<(String, u64)> {
    let size = std::fs::metadata(path).map_err(|e| Error::io("reading", path, e))?.len();
    Ok((crate::bundle::sha256_file(path)?, size))
}

async fn upload_multipart(
    client: &Client,
    bucket: &str,
    key: &str,
    path: &Path,
    size: u64,
    transfer: &Transfer,
) -> Result<()> {
    let fail = |e: String| Error::s3("PUT", bucket, key, e);
    let created = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .checksum_algorithm(ChecksumAlgorithm::Sha256)
        .send()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let upload_id = created.upload_id().ok_or_else(|| fail("no upload id".to_owned()))?.to_owned();
    let parts = size.div_ceil(PART_SIZE);
    let uploads = futures::stream::iter(1..=parts)
        .map(|number| {
            let upload_id = upload_id.clone();
            async move {
                let offset = (number - 1) * PART_SIZE;
                let length = PART_SIZE.min(size - offset);
                let bytes = read_part(path, offset, length).map_err(|e| Error::io("reading", path, e))?;
                let checksum = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&bytes));
                let out = client
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(i32::try_from(number).unwrap_or(i32::MAX))
                    .checksum_sha256(&checksum)
                    .body(ByteStream::from(bytes))
                    .send()
                    .await
                    .map_err(|e| Error::s3("PUT", bucket, key, format!("part {number}: {e}")))?;
                Ok::<_, Error>(
                    CompletedPart::builder()
                        .part_number(i32::try_from(number).unwrap_or(i32::MAX))
                        .set_e_tag(out.e_tag().map(str::to_owned))
                        .checksum_sha256(checksum)
                        .build(),
                )
            }
        })
        .buffered(transfer.concurrency.clamp(1, 4))
        .collect::<Vec<_>>()
        .await;
    let completed: Result<Vec<CompletedPart>> = uploads.into_iter().collect();
    let completed = match completed {
        Ok(parts) => parts,
        Err(error) => {
            let _ = client.abort_multipart_upload().bucket(bucket).key(key).upload_id(&upload_id).send().await;
            return Err(error);
        }
    };
    client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(&upload_id)
        .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(completed)).build())
        .send()
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(())
}

fn read_part(path: &Path, offset: u64, length: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = vec![0u8; usize::try_from(length).unwrap_or(0)];
    file.read_exact(&mut bytes)?;
    Ok(bytes)
}
