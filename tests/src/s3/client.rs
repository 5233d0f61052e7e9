//! An `aws-sdk-s3` client for an [`S3Server`]: signed with its keys, trusting only its CA.

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};

use super::server::S3Server;

/// The client's configuration, for tests that change part of it (credentials, retries).
pub fn client_config(server: &S3Server) -> aws_sdk_s3::config::Builder {
    let trust = TrustStore::empty().with_pem_certificate(server.ca_pem().as_bytes());
    let tls = TlsContext::builder().with_trust_store(trust).build().expect("a TLS context trusting the S3 server's CA");
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .tls_context(tls)
        .build_https();
    aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(server.region().to_owned()))
        .endpoint_url(server.endpoint())
        .force_path_style(true)
        .credentials_provider(Credentials::new(server.access_key(), server.secret_key(), None, None, "s3-server"))
        .http_client(http)
}

pub fn client(server: &S3Server) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(client_config(server).build())
}
