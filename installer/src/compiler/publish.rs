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
use crate::s3::{self, Bucket, BundleKeys, Transfer};
use crate::{Error, Result};

/// Objects above this size are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 32 << 20;
const PART_SIZE: u64 = 16 << 20;
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
/// Everything is checked before the bucket changes: the bundle's own manifest, the names that
/// become keys, the Garden Linux version it was packed for. A refused publish leaves the bucket
/// as it was.
pub async fn publish(
    bucket: &Bucket,
    bundle: &Path,
    gardenlinux: &str,
    force: bool,
    transfer: &Transfer,
) -> Result<Published> {
    let (client, bucket) = (&bucket.client, bucket.name.as_str());
    // The archive as a node will check it: every entry, every digest, before the bucket changes.
    let inner = crate::bundle::verify_packed(bundle)?;
    let keys = BundleKeys::new(gardenlinux, &inner.kernel_release, &inner.driver_version)?;
    nvidia_contract::names::check(nvidia_contract::NameKind::Flavor, &inner.flavor)?;
    if let Some(packed_for) = inner.gardenlinux_version.as_deref().filter(|v| *v != gardenlinux) {
        return Err(Error::Manifest {
            source_name: bundle.display().to_string(),
            reason: format!("was packed for Garden Linux {packed_for}, not {gardenlinux}"),
        });
    }
    let (sha256, size) = digest(bundle)?;
    // The copy beside the archive is the archive's own manifest plus the archive's digest.
    let manifest = Manifest { archive: Some(crate::bundle::manifest::ArchiveEntry { sha256, size }), ..inner.clone() };
    if !force {
        // The same bundle again (a restarted compiler pod) is done already; another one is refused.
        if let Some(bytes) = s3::get_small(client, bucket, &keys.manifest, MAX_MANIFEST_BYTES, transfer).await? {
            let published = Manifest::parse(&bytes, &format!("s3://{bucket}/{}", keys.manifest)).ok();
            let archive = s3::head(client, bucket, &keys.archive, transfer).await?;
            if published.as_ref() == Some(&manifest) && archive.is_some_and(|(bytes, _)| bytes == size) {
                info!(bucket, key = %keys.archive, "this very bundle is already published; nothing to do");
                return Ok(Published {
                    archive_key: keys.archive,
                    manifest_key: keys.manifest,
                    manifest,
                    unchanged: true,
                });
            }
            return Err(Error::s3(
                "PUT",
                bucket,
                &keys.manifest,
                "already exists and describes another bundle; pass --force to replace it".to_owned(),
            ));
        }
        if s3::head(client, bucket, &keys.archive, transfer).await?.is_some() {
            return Err(Error::s3(
                "PUT",
                bucket,
                &keys.archive,
                "already exists; pass --force to replace it".to_owned(),
            ));
        }
    }
    if force {
        // Take the manifest away first: while the archive is replaced, readers find nothing
        // rather than an old manifest beside a new archive.
        client
            .delete_object()
            .bucket(bucket)
            .key(&keys.manifest)
            .send()
            .await
            .map_err(|e| Error::s3("DELETE", bucket, &keys.manifest, e.to_string()))?;
    }
    info!(bucket, key = %keys.archive, bytes = size, "uploading the bundle");
    if size > MULTIPART_THRESHOLD {
        upload_multipart(client, bucket, &keys.archive, bundle, size, transfer).await?;
    } else {
        let body =
            ByteStream::from_path(bundle).await.map_err(|e| Error::s3("PUT", bucket, &keys.archive, e.to_string()))?;
        client
            .put_object()
            .bucket(bucket)
            .key(&keys.archive)
            .body(body)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(|e| Error::s3("PUT", bucket, &keys.archive, e.to_string()))?;
    }
    let body = manifest.to_json();
    client
        .put_object()
        .bucket(bucket)
        .key(&keys.manifest)
        .content_type("application/json")
        .body(ByteStream::from(body))
        .checksum_algorithm(ChecksumAlgorithm::Sha256)
        .send()
        .await
        .map_err(|e| Error::s3("PUT", bucket, &keys.manifest, e.to_string()))?;
    info!(bucket, key = %keys.manifest, "manifest published");
    Ok(Published { archive_key: keys.archive, manifest_key: keys.manifest, manifest, unchanged: false })
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
