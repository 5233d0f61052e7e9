//! Fuzz-style property test on stable Rust: arbitrary and mutated bytes into the AdmissionReview
//! reader and, through the router, the whole request path. Whatever comes in: an answer, never a
//! panic; and what reads as a review is decided on without panicking.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use nvidia_webhook::InjectConfig;
use nvidia_webhook::admission::{AppState, parse_review, router};
use proptest::prelude::*;
use tower::ServiceExt;

fn golden(name: &str) -> Vec<u8> {
    std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)).expect("golden")
}

fn mutate(mut bytes: Vec<u8>, flips: &[(usize, u8)], cut: Option<f64>) -> Vec<u8> {
    let len = bytes.len();
    for &(at, xor) in flips {
        if len > 0 {
            bytes[at % len] ^= xor;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate((len as f64 * cut) as usize);
    }
    bytes
}

fn answer(state: &Arc<AppState>, runtime: &tokio::runtime::Runtime, body: Vec<u8>) -> StatusCode {
    let request = Request::post("/mutate").header("content-type", "application/json").body(Body::from(body));
    let response = runtime
        .block_on(router(state.clone()).oneshot(request.expect("request")))
        .expect("the router answers every request");
    response.status()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_body_gets_an_answer_never_a_panic(
        raw in prop::collection::vec(any::<u8>(), 0..2048),
        case in prop::sample::select(vec![
            "gpu-pod-typical.review.json", "guaranteed-qos.review.json", "native-sidecar-and-gpu-init.review.json",
            "ld-library-path.review.json", "references-injected-root-volume.review.json", "pinned-version.review.json",
        ]),
        flips in prop::collection::vec((any::<usize>(), 1u8..=255), 0..8),
        cut in prop::option::of(0.0f64..1.0),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let state = AppState::new(InjectConfig::new("registry.example/nvidia-installer:1"));
        let _ = parse_review(&raw);
        let status = answer(&state, &runtime, raw);
        prop_assert!(status == StatusCode::OK || status.is_client_error(), "{}", status);
        let mutated = mutate(golden(case), &flips, cut);
        let _ = parse_review(&mutated);
        let status = answer(&state, &runtime, mutated);
        prop_assert!(status == StatusCode::OK || status.is_client_error(), "{}", status);
    }
}
