//! The `s3s-fs` backend, shared by the served S3 service and the helpers that seed and inspect the
//! store. One `FileSystem` serves both, because its temporary file names are unique only within
//! one instance, and writing through it records the ETag that later GETs reuse instead of hashing
//! the whole object again.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use hyper::header::HeaderMap;
use hyper::http::Extensions;
use hyper::{Method, Uri};
use s3s::dto::{self, StreamingBlob};
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result};
use s3s_fs::FileSystem;
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

/// Objects are read from disk in blocks of this size.
const READ_BLOCK: usize = 1 << 20;

#[derive(Debug, Clone)]
pub(crate) struct Backend {
    fs: Arc<FileSystem>,
    /// The store's directory, as `s3s-fs` resolves it.
    root: PathBuf,
}

/// Implements `S3` for [`Backend`]: the listed operations go to `s3s-fs` as they are, the methods
/// after the `;` are written out.
macro_rules! delegate {
    ($($op:ident: $input:ident => $output:ident,)* ; $($own:tt)*) => {
        #[async_trait::async_trait]
        impl S3 for Backend {
            $(
                async fn $op(&self, req: S3Request<dto::$input>) -> S3Result<S3Response<dto::$output>> {
                    self.fs.$op(req).await
                }
            )*
            $($own)*
        }
    };
}

delegate! {
    abort_multipart_upload: AbortMultipartUploadInput => AbortMultipartUploadOutput,
    complete_multipart_upload: CompleteMultipartUploadInput => CompleteMultipartUploadOutput,
    copy_object: CopyObjectInput => CopyObjectOutput,
    create_bucket: CreateBucketInput => CreateBucketOutput,
    create_multipart_upload: CreateMultipartUploadInput => CreateMultipartUploadOutput,
    delete_bucket: DeleteBucketInput => DeleteBucketOutput,
    delete_object: DeleteObjectInput => DeleteObjectOutput,
    delete_objects: DeleteObjectsInput => DeleteObjectsOutput,
    get_bucket_location: GetBucketLocationInput => GetBucketLocationOutput,
    head_bucket: HeadBucketInput => HeadBucketOutput,
    head_object: HeadObjectInput => HeadObjectOutput,
    list_buckets: ListBucketsInput => ListBucketsOutput,
    list_objects: ListObjectsInput => ListObjectsOutput,
    list_objects_v2: ListObjectsV2Input => ListObjectsV2Output,
    list_parts: ListPartsInput => ListPartsOutput,
    put_object: PutObjectInput => PutObjectOutput,
    upload_part: UploadPartInput => UploadPartOutput,
    upload_part_copy: UploadPartCopyInput => UploadPartCopyOutput,
    ;
    /// `s3s-fs` streams an object 4 KiB at a time, each read a trip through tokio's blocking pool,
    /// which holds a connection well below what a real bucket sends. Its answer (status, headers,
    /// ETag, range checks) is kept and the body read again in large blocks.
    async fn get_object(&self, req: S3Request<dto::GetObjectInput>) -> S3Result<S3Response<dto::GetObjectOutput>> {
        let path = self.root.join(&req.input.bucket).join(&req.input.key);
        let range = req.input.range;
        let mut response = self.fs.get_object(req).await?;
        let internal = |error: std::io::Error| S3Error::with_source(S3ErrorCode::InternalError, Box::new(error));
        let mut file = File::open(&path).await.map_err(internal)?;
        let file_len = file.metadata().await.map_err(internal)?.len();
        let span = match range {
            Some(range) => range.check(file_len).map_err(|_| S3Error::new(S3ErrorCode::InvalidRange))?,
            None => 0..file_len,
        };
        file.seek(SeekFrom::Start(span.start)).await.map_err(internal)?;
        let body = ReaderStream::with_capacity(file.take(span.end - span.start), READ_BLOCK);
        response.output.body = Some(StreamingBlob::wrap(body));
        Ok(response)
    }
}

/// A request made by the test harness itself, straight to the backend.
fn request<T>(input: T, method: Method) -> S3Request<T> {
    S3Request {
        input,
        method,
        uri: Uri::from_static("/"),
        headers: HeaderMap::new(),
        extensions: Extensions::new(),
        credentials: None,
        region: None,
        service: None,
        trailing_headers: None,
    }
}

fn build<T>(what: &str, input: Result<T, dto::builders::BuildError>) -> T {
    input.unwrap_or_else(|error| panic!("building the {what} input: {error:?}"))
}

impl Backend {
    pub(crate) fn new(root: &Path) -> Self {
        let fs = FileSystem::new(root)
            .unwrap_or_else(|error| panic!("opening the S3 store at {}: {error:?}", root.display()));
        let root = root.canonicalize().unwrap_or_else(|error| panic!("resolving {}: {error}", root.display()));
        Self { fs: Arc::new(fs), root }
    }

    pub(crate) async fn create_bucket(&self, bucket: &str) {
        assert!(s3s::path::check_bucket_name(bucket), "{bucket:?} is not a valid S3 bucket name");
        let input = build("CreateBucket", dto::CreateBucketInput::builder().bucket(bucket.to_owned()).build());
        if let Err(error) = self.fs.create_bucket(request(input, Method::PUT)).await {
            panic!("creating bucket {bucket}: {error:?}");
        }
    }

    pub(crate) async fn put_object(&self, bucket: &str, key: &str, body: Bytes) {
        let length = i64::try_from(body.len()).expect("an object size fits i64");
        self.put(bucket, key, StreamingBlob::from(s3s::Body::from(body)), Some(length)).await;
    }

    pub(crate) async fn put_file(&self, bucket: &str, key: &str, path: &Path) {
        let file =
            File::open(path).await.unwrap_or_else(|error| panic!("opening {} to upload it: {error}", path.display()));
        let length = file
            .metadata()
            .await
            .unwrap_or_else(|error| panic!("reading the size of {}: {error}", path.display()))
            .len();
        let length = i64::try_from(length).expect("a file size fits i64");
        let body = StreamingBlob::wrap(ReaderStream::with_capacity(file, 1 << 20));
        self.put(bucket, key, body, Some(length)).await;
    }

    async fn put(&self, bucket: &str, key: &str, body: StreamingBlob, length: Option<i64>) {
        let input = build(
            "PutObject",
            dto::PutObjectInput::builder()
                .bucket(bucket.to_owned())
                .key(key.to_owned())
                .body(Some(body))
                .content_length(length)
                .build(),
        );
        if let Err(error) = self.fs.put_object(request(input, Method::PUT)).await {
            panic!("putting s3://{bucket}/{key}: {error:?}");
        }
    }

    pub(crate) async fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let input =
            build("GetObject", dto::GetObjectInput::builder().bucket(bucket.to_owned()).key(key.to_owned()).build());
        let output = match S3::get_object(self, request(input, Method::GET)).await {
            Ok(response) => response.output,
            Err(error) if *error.code() == S3ErrorCode::NoSuchKey => return None,
            Err(error) => panic!("getting s3://{bucket}/{key}: {error:?}"),
        };
        let mut data = Vec::new();
        if let Some(mut body) = output.body {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.unwrap_or_else(|error| panic!("reading s3://{bucket}/{key}: {error}"));
                data.extend_from_slice(&chunk);
            }
        }
        Some(data)
    }

    pub(crate) async fn list(&self, bucket: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let input = build(
                "ListObjectsV2",
                dto::ListObjectsV2Input::builder().bucket(bucket.to_owned()).continuation_token(token).build(),
            );
            let output = match self.fs.list_objects_v2(request(input, Method::GET)).await {
                Ok(response) => response.output,
                Err(error) => panic!("listing bucket {bucket}: {error:?}"),
            };
            keys.extend(output.contents.unwrap_or_default().into_iter().filter_map(|object| object.key));
            token = output.next_continuation_token;
            if output.is_truncated != Some(true) || token.is_none() {
                return keys;
            }
        }
    }
}
