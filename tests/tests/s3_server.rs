//! The loopback S3 server against real clients: signing, TLS, faults, ranges, the bandwidth cap.

use std::sync::Arc;

use aws_sdk_s3::config::Credentials;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use integration_tests::s3::{self, Fault, LogEntry, Method, Options, S3Server};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BUCKET: &str = "drivers";
const KEY: &str = "gardenlinux-1592.9-nvidia-550.127.05.tar.gz";

/// Bytes that differ from their neighbours, so a wrong offset shows.
fn object(len: usize) -> Vec<u8> {
    (0..len).map(|i| u8::try_from((i * 31 + i / 251) % 256).expect("below 256")).collect()
}

fn seeded(len: usize) -> (S3Server, Vec<u8>) {
    seeded_with(Options::default(), len)
}

fn seeded_with(options: Options, len: usize) -> (S3Server, Vec<u8>) {
    let server = S3Server::start_with(options);
    let data = object(len);
    server.create_bucket(BUCKET);
    server.put_object(BUCKET, KEY, data.clone());
    (server, data)
}

fn without_retries(server: &S3Server) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(s3::client_config(server).retry_config(RetryConfig::disabled()).build())
}

async fn get(client: &aws_sdk_s3::Client, key: &str, range: Option<&str>) -> Vec<u8> {
    let output = client
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .set_range(range.map(str::to_owned))
        .send()
        .await
        .unwrap_or_else(|error| panic!("GET {key} {range:?}: {:?}", error.into_service_error()));
    output.body.collect().await.expect("reading the body").into_bytes().to_vec()
}

fn status<E>(error: &SdkError<E, HttpResponse>) -> Option<u16> {
    error.raw_response().map(|response| response.status().as_u16())
}

#[tokio::test]
async fn signed_requests_work_over_tls_and_share_the_store_with_the_helpers() {
    let (server, data) = seeded(70_000);
    let client = s3::client(&server);

    let buckets = client.list_buckets().send().await.expect("ListBuckets");
    let names: Vec<_> = buckets.buckets().iter().filter_map(|bucket| bucket.name()).collect();
    assert_eq!(names, [BUCKET]);

    let head = client.head_object().bucket(BUCKET).key(KEY).send().await.expect("HeadObject");
    assert_eq!(head.content_length(), Some(70_000));

    let uploaded = object(1234);
    client
        .put_object()
        .bucket(BUCKET)
        .key("bundles/by-sdk.tar.zst")
        .body(ByteStream::from(uploaded.clone()))
        .send()
        .await
        .expect("PutObject");
    assert_eq!(get(&client, KEY, None).await, data);

    assert_eq!(server.get_object(BUCKET, "bundles/by-sdk.tar.zst"), Some(uploaded));
    assert_eq!(server.get_object(BUCKET, "missing"), None);
    assert_eq!(server.list(BUCKET), ["bundles/by-sdk.tar.zst", KEY]);

    let seen: Vec<_> = server.log().entries().into_iter().map(|entry| (entry.method, entry.status)).collect();
    assert_eq!(
        seen,
        [(Method::GET, Some(200)), (Method::HEAD, Some(200)), (Method::PUT, Some(200)), (Method::GET, Some(200)),],
        "only the client's requests are logged, not the helpers'"
    );
    let last = server.log().entries().pop().expect("the last GET");
    assert_eq!(last.path, format!("/{BUCKET}/{KEY}"));
    assert_eq!(last.bytes_sent, 70_000);
    server.log().clear();
    assert!(server.log().is_empty());
}

#[tokio::test]
async fn a_wrong_secret_key_is_refused() {
    let (server, _) = seeded(10);
    let wrong = Credentials::new(server.access_key(), "not-the-secret-key", None, None, "test");
    let client = aws_sdk_s3::Client::from_conf(
        s3::client_config(&server).credentials_provider(wrong).retry_config(RetryConfig::disabled()).build(),
    );

    let error = client.get_object().bucket(BUCKET).key(KEY).send().await.expect_err("a wrong signature is refused");
    assert_eq!(status(&error), Some(403));
    assert_eq!(error.code(), Some("SignatureDoesNotMatch"));
}

#[tokio::test]
async fn an_unsigned_request_is_refused() {
    let (server, _) = seeded(10);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(server.ca_pem().as_bytes()) {
        roots.add(cert.expect("reading the CA PEM")).expect("adding the CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.addr()).await.expect("connecting");
    let name = ServerName::try_from("localhost").expect("a valid name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake with the server's CA trusted");

    let request = format!("GET /{BUCKET}/{KEY} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.expect("sending the request");
    let mut response = Vec::new();
    // The server may close without a TLS close_notify; what arrived before is what counts.
    tls.read_to_end(&mut response).await.ok();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 403"), "unsigned GET answered: {response}");
    assert!(response.contains("<Code>AccessDenied</Code>"), "unsigned GET answered: {response}");
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_cannot_connect() {
    let (server, _) = seeded(10);
    let other = S3Server::start();
    let client = aws_sdk_s3::Client::from_conf(
        s3::client_config(&other)
            .endpoint_url(server.endpoint())
            .credentials_provider(Credentials::new(server.access_key(), server.secret_key(), None, None, "test"))
            .retry_config(RetryConfig::disabled())
            .build(),
    );

    let error = client.head_object().bucket(BUCKET).key(KEY).send().await.expect_err("an unknown CA is refused");
    assert!(matches!(error, SdkError::DispatchFailure(_)), "expected a connection failure, got {error:?}");
    assert!(server.log().is_empty(), "no request got through: {:?}", server.log().entries());
}

#[tokio::test]
async fn error_faults_reach_the_client_once_each() {
    let (server, data) = seeded(5000);
    let client = without_retries(&server);
    let cases = [
        (Fault::SlowDown, 503, "SlowDown"),
        (Fault::InternalError, 500, "InternalError"),
        (Fault::AccessDenied, 403, "AccessDenied"),
        (Fault::NoSuchKey, 404, "NoSuchKey"),
    ];

    for (fault, expected_status, code) in cases {
        server.faults().inject(Method::GET, "nvidia-550", fault.clone());
        let error = client.get_object().bucket(BUCKET).key(KEY).send().await.expect_err("the fault applies");
        assert_eq!(status(&error), Some(expected_status), "{fault:?}");
        assert_eq!(error.code(), Some(code), "{fault:?}");
        assert_eq!(server.faults().pending(), 0, "{fault:?} is used up");
        assert_eq!(get(&client, KEY, None).await, data, "the request after {fault:?} is served");
    }

    let faulted: Vec<_> =
        server.log().entries().into_iter().filter(|entry| entry.fault.is_some()).map(|entry| entry.status).collect();
    assert_eq!(faulted, [Some(503), Some(500), Some(403), Some(404)]);
}

#[tokio::test]
async fn faults_match_method_and_key() {
    let (server, data) = seeded(100);
    let client = without_retries(&server);
    server.faults().inject(Method::GET, "some-other-key", Fault::InternalError);
    server.faults().inject(Method::HEAD, KEY, Fault::InternalError);

    assert_eq!(get(&client, KEY, None).await, data);
    assert_eq!(server.faults().pending(), 2);
    let error = client.head_object().bucket(BUCKET).key(KEY).send().await.expect_err("HEAD is faulted");
    assert_eq!(status(&error), Some(500));
    assert_eq!(server.faults().pending(), 1);
    server.faults().clear();
    assert_eq!(server.faults().pending(), 0);
}

#[tokio::test]
async fn a_reset_connection_is_a_transport_error() {
    let (server, data) = seeded(100);
    let client = without_retries(&server);
    server.faults().inject(Method::GET, KEY, Fault::Reset);

    let error = client.get_object().bucket(BUCKET).key(KEY).send().await.expect_err("the connection is reset");
    assert!(error.raw_response().is_none(), "no response arrived: {error:?}");
    assert_eq!(get(&client, KEY, None).await, data);
    let statuses: Vec<_> = server.log().entries().into_iter().map(|entry| entry.status).collect();
    assert_eq!(statuses, [None, Some(200)]);
}

#[tokio::test]
async fn the_sdk_retries_transient_faults() {
    let (server, data) = seeded(100);
    let client = s3::client(&server);
    server.faults().inject(Method::GET, KEY, Fault::SlowDown);
    server.faults().inject(Method::GET, KEY, Fault::Reset);

    assert_eq!(get(&client, KEY, None).await, data);
    let statuses: Vec<_> = server.log().entries().into_iter().map(|entry| entry.status).collect();
    assert_eq!(statuses, [Some(503), None, Some(200)]);
}

#[tokio::test]
async fn a_cut_body_fails_while_reading_after_exactly_the_bytes_allowed() {
    let (server, data) = seeded(1 << 20);
    let client = without_retries(&server);
    server.faults().inject(Method::GET, KEY, Fault::CutBody { after: 300_000 });

    let mut output = client.get_object().bucket(BUCKET).key(KEY).send().await.expect("status and headers arrive");
    assert_eq!(output.content_length(), Some(1 << 20));
    let mut received = Vec::new();
    let error = loop {
        match output.body.next().await {
            Some(Ok(chunk)) => received.extend_from_slice(&chunk),
            Some(Err(error)) => break error,
            None => panic!("the body ended cleanly after {} bytes", received.len()),
        }
    };
    assert_eq!(received.len(), 300_000, "body read failed with {error}");
    assert!(received == data[..300_000], "the bytes before the cut are the object's");

    let entry: LogEntry = server.log().matching(&Method::GET, KEY).pop().expect("the GET is logged");
    assert_eq!(entry.status, Some(200));
    assert_eq!(entry.bytes_sent, 300_000);
    assert_eq!(entry.fault, Some(Fault::CutBody { after: 300_000 }));
    assert_eq!(get(&client, KEY, None).await, data, "the next GET is whole");
}

#[tokio::test]
async fn a_cut_beyond_the_body_sends_it_whole() {
    let (server, data) = seeded(1000);
    let client = without_retries(&server);
    server.faults().inject(Method::GET, KEY, Fault::CutBody { after: 1000 });

    assert_eq!(get(&client, KEY, None).await, data);
    assert_eq!(server.log().bytes_sent(), 1000);
}

#[tokio::test]
async fn ranged_gets_return_the_right_bytes() {
    let len = (1 << 20) + 7;
    let (server, data) = seeded(len);
    let client = s3::client(&server);
    let cases = [
        ("bytes=0-99", 0..100),
        ("bytes=1000-1999", 1000..2000),
        ("bytes=-100", len - 100..len),
        ("bytes=1048000-", 1_048_000..len),
    ];

    for (range, expected) in cases.clone() {
        let output = client.get_object().bucket(BUCKET).key(KEY).range(range).send().await.expect("ranged GET");
        let expected_range = format!("bytes {}-{}/{len}", expected.start, expected.end - 1);
        assert_eq!(output.content_range(), Some(expected_range.as_str()), "{range}");
        let body = output.body.collect().await.expect("reading the body").into_bytes();
        assert!(body[..] == data[expected.clone()], "{range} returned other bytes");
    }

    let logged: Vec<_> = server.log().entries().into_iter().map(|entry| (entry.range, entry.bytes_sent)).collect();
    let expected: Vec<_> =
        cases.into_iter().map(|(range, bytes)| (Some(range.to_owned()), bytes.len() as u64)).collect();
    assert_eq!(logged, expected);
}

#[tokio::test]
async fn the_bandwidth_cap_paces_responses_without_losing_bytes() {
    let limit = 8 << 20;
    let (server, data) = seeded_with(Options { bandwidth_limit: Some(limit) }, 2 << 20);
    let client = s3::client(&server);
    assert_eq!(server.bandwidth_limit(), Some(limit));

    assert_eq!(get(&client, KEY, None).await, data);
    assert_eq!(get(&client, KEY, Some("bytes=100-")).await, data[100..]);
    server.set_bandwidth_limit(None);
    assert_eq!(get(&client, KEY, None).await, data);

    let logged: Vec<_> =
        server.log().entries().into_iter().map(|entry| (entry.bandwidth_limit, entry.bytes_sent)).collect();
    let len = data.len() as u64;
    assert_eq!(logged, [(Some(limit), len), (Some(limit), len - 100), (None, len)]);
}

#[test]
fn env_names_the_server_for_a_client_process() {
    let server = S3Server::start();
    let env = server.env();
    let value = |name: &str| env.iter().find(|(key, _)| *key == name).map(|(_, value)| value.clone());

    assert_eq!(value("AWS_ACCESS_KEY_ID").as_deref(), Some(server.access_key()));
    assert_eq!(value("AWS_SECRET_ACCESS_KEY").as_deref(), Some(server.secret_key()));
    assert_eq!(value("AWS_REGION").as_deref(), Some("us-east-1"));
    assert_eq!(value("NVIDIA_INSTALLER_S3_ENDPOINT").as_deref(), Some(server.endpoint()));
    assert!(server.endpoint().starts_with("https://127.0.0.1:"));
    let ca_file = value("NVIDIA_INSTALLER_S3_CA_FILE").expect("the CA file is named");
    assert_eq!(std::fs::read_to_string(ca_file).expect("reading the CA file"), server.ca_pem());
    assert_ne!(server.secret_key(), S3Server::start().secret_key(), "each server has its own keys");
}

#[test]
fn helpers_work_without_a_runtime_and_the_store_goes_with_the_server() {
    let server = S3Server::start();
    server.create_bucket("a-bucket");
    server.put_object("a-bucket", "dir/one", b"1".to_vec());
    let file = server.root().join("upload-source");
    std::fs::write(&file, object(3 << 20)).expect("writing the file to upload");
    server.put_file("a-bucket", "dir/two", &file);

    assert_eq!(server.get_object("a-bucket", "dir/one").as_deref(), Some(&b"1"[..]));
    assert_eq!(server.get_object("a-bucket", "dir/two"), Some(object(3 << 20)));
    assert_eq!(server.list("a-bucket"), ["dir/one", "dir/two"]);

    let root = server.root().to_owned();
    drop(server);
    assert!(!root.exists(), "{} is removed with the server", root.display());
}
