//! The identity source against the fake agent, end to end over a real unix socket.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic::Code;

use super::fake::{FakeAgent, TestCa, WorkloadKey};
use super::*;

const WAIT: Duration = Duration::from_secs(5);
const TTL: Duration = Duration::from_secs(3600);

fn sel(s: &str) -> Selector {
    s.parse().unwrap()
}

fn selectors(list: &[&str]) -> Workload {
    Workload::Selectors(list.iter().map(|s| sel(s)).collect())
}

fn api() -> DelegatedIdentityApi {
    DelegatedIdentityApi::new(ApiConfig {
        connect_timeout: Duration::from_millis(500),
        ..ApiConfig::default()
    })
}

fn update(svids: Vec<X509Svid>) -> SvidUpdate {
    SvidUpdate {
        svids,
        federates_with: Vec::new(),
    }
}

async fn next<T>(stream: &mut (impl Stream<Item = T> + Unpin)) -> T {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("an item in time")
        .expect("the stream has not ended")
}

async fn subscribe(api: &DelegatedIdentityApi, agent: &Path, workload: &Workload) -> SvidStream {
    tokio::time::timeout(WAIT, api.subscribe_svids(agent, workload))
        .await
        .expect("the call resolves in time")
        .expect("the call succeeds")
}

#[tokio::test]
async fn subscribes_by_pid_and_gets_a_usable_svid() {
    let fake = FakeAgent::start().await.unwrap();
    let ca = TestCa::new("example.org").unwrap();
    let svid = ca.mint("/workload/a", TTL).unwrap();
    fake.set_svids(
        WorkloadKey::Pid(4242),
        SvidUpdate {
            svids: vec![svid.clone()],
            federates_with: vec![TrustDomain::parse("other.org").unwrap()],
        },
    );

    let api = api();
    let mut stream = subscribe(&api, fake.path(), &Workload::Pid(4242)).await;
    let got = next(&mut stream).await.unwrap();
    assert_eq!(got.svids, vec![svid.clone()]);
    assert_eq!(got.federates_with, ["other.org"]);

    let leaf = &got.svids[0];
    assert_eq!(leaf.spiffe_id, "spiffe://example.org/workload/a");
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf.cert_chain[0]).unwrap();
    assert_eq!(cert.validity().not_after.timestamp(), leaf.expires_at);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(san.value.general_names.iter().any(
        |n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if leaf.spiffe_id == *u)
    ));
    // PKCS#8 that rcgen can load back.
    rcgen::KeyPair::try_from(&leaf.private_key[..]).unwrap();

    let stats = fake.stats();
    assert_eq!(stats.svid_subscriptions.len(), 1);
    assert_eq!(stats.svid_subscriptions[0].pid, 4242);
    assert!(stats.svid_subscriptions[0].selectors.is_empty());
    assert_eq!(stats.open_svid_streams, 1);

    drop(stream);
    assert!(fake.wait_until(WAIT, |s| s.open_svid_streams == 0).await);
}

#[tokio::test]
async fn subscribes_by_selectors_with_subset_matching() {
    let fake = FakeAgent::start().await.unwrap();
    let ca = TestCa::new("example.org").unwrap();
    let ns = ca.mint("/ns/a", TTL).unwrap();
    let sa = ca.mint("/ns/a/sa/web", TTL).unwrap();
    let other = ca.mint("/ns/b", TTL).unwrap();
    let key = |list: &[&str]| WorkloadKey::Selectors(list.iter().map(|s| sel(s)).collect());
    fake.set_svids(key(&["k8s:ns:a"]), update(vec![ns.clone()]));
    fake.set_svids(key(&["k8s:ns:a", "k8s:sa:web"]), update(vec![sa.clone()]));
    fake.set_svids(key(&["k8s:ns:b"]), update(vec![other]));

    let api = api();
    let workload = selectors(&["k8s:ns:a", "k8s:sa:web", "k8s:pod-name:p"]);
    let mut stream = subscribe(&api, fake.path(), &workload).await;
    let got = next(&mut stream).await.unwrap();
    assert_eq!(got.svids, vec![ns, sa]);
    let seen = &fake.stats().svid_subscriptions[0];
    assert_eq!(seen.pid, 0);
    assert_eq!(seen.selectors.len(), 3);

    // Nothing matches: an empty first message at once, and the stream stays open.
    let mut empty = subscribe(&api, fake.path(), &selectors(&["k8s:ns:c"])).await;
    assert_eq!(next(&mut empty).await.unwrap(), SvidUpdate::default());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), empty.next())
            .await
            .is_err()
    );
    // One connection serves both streams.
    assert_eq!(fake.stats().connections, 1);
}

#[tokio::test]
async fn rotation_and_entry_changes_push_complete_sets() {
    let fake = FakeAgent::start().await.unwrap();
    let ca = TestCa::new("example.org").unwrap().intermediate().unwrap();
    let first = ca.mint("/w", TTL).unwrap();
    assert_eq!(first.cert_chain.len(), 2, "leaf and intermediate");
    fake.set_svids(WorkloadKey::Pid(7), update(vec![first.clone()]));

    let api = api();
    let mut stream = subscribe(&api, fake.path(), &Workload::Pid(7)).await;
    assert_eq!(next(&mut stream).await.unwrap().svids, vec![first.clone()]);

    // Rotation: a new certificate and a new key.
    let rotated = ca.mint("/w", TTL).unwrap();
    fake.set_svids(WorkloadKey::Pid(7), update(vec![rotated.clone()]));
    let got = next(&mut stream).await.unwrap();
    assert_eq!(got.svids, vec![rotated.clone()]);
    assert_ne!(got.svids[0].private_key, first.private_key);

    // An unrelated workload's change does not reach this stream...
    fake.set_svids(WorkloadKey::Pid(8), update(vec![first.clone()]));
    // ...but a local bundle change resends the unchanged set to everyone.
    fake.notify_all();
    assert_eq!(next(&mut stream).await.unwrap().svids, vec![rotated]);

    // The entry goes away: an empty set, and the stream stays open.
    fake.remove_svids(WorkloadKey::Pid(7));
    assert_eq!(next(&mut stream).await.unwrap(), SvidUpdate::default());
}

#[tokio::test]
async fn unusable_svids_are_dropped_from_the_set() {
    let fake = FakeAgent::start().await.unwrap();
    let ca = TestCa::new("example.org").unwrap();
    let good = ca.mint("/good", TTL).unwrap();
    let mut no_chain = ca.mint("/no-chain", TTL).unwrap();
    no_chain.cert_chain.clear();
    let mut no_key = ca.mint("/no-key", TTL).unwrap();
    no_key.private_key.clear();
    fake.set_svids(
        WorkloadKey::Pid(5),
        update(vec![no_chain, good.clone(), no_key]),
    );
    let api = api();
    let mut stream = subscribe(&api, fake.path(), &Workload::Pid(5)).await;
    assert_eq!(next(&mut stream).await.unwrap().svids, vec![good]);
}

#[tokio::test]
async fn bundles_are_split_into_certificates() {
    let fake = FakeAgent::start().await.unwrap();
    let root = TestCa::new("example.org").unwrap();
    let second = TestCa::new("example.org").unwrap();
    let third = root.intermediate().unwrap();
    let local: Vec<Vec<u8>> = [&root, &second, &third]
        .iter()
        .map(|ca| ca.cert_der().to_vec())
        .collect();
    let federated = TestCa::new("other.org").unwrap();
    fake.set_bundle(&root.trust_domain_id(), &local);
    fake.set_bundle(
        &federated.trust_domain_id(),
        &[federated.cert_der().to_vec()],
    );

    let api = api();
    let mut stream = tokio::time::timeout(WAIT, api.subscribe_bundles(fake.path()))
        .await
        .unwrap()
        .unwrap();
    let set = next(&mut stream).await.unwrap();
    assert_eq!(set.bundles.len(), 2);
    let got = &set.bundles["example.org"];
    assert_eq!(got, &local);
    for der in got {
        let (rest, _) = x509_parser::parse_x509_certificate(der).unwrap();
        assert!(rest.is_empty());
    }
    assert_eq!(
        set.bundles["other.org"],
        vec![federated.cert_der().to_vec()]
    );

    // A change is pushed; then malformed DER ends the stream with a decode error.
    fake.remove_bundle("spiffe://other.org");
    assert_eq!(next(&mut stream).await.unwrap().bundles.len(), 1);
    let mut truncated = root.cert_der().to_vec();
    truncated.truncate(truncated.len() - 1);
    fake.set_bundle_raw("spiffe://example.org", truncated);
    let err = next(&mut stream).await.unwrap_err();
    assert!(matches!(
        err,
        SourceError::Decode(DecodeError::Bundle {
            error: DerError::Truncated { .. },
            ..
        })
    ));
    assert_eq!(err.kind(), "decode");
    assert!(stream.next().await.is_none(), "an error is the last item");
    assert!(fake.wait_until(WAIT, |s| s.open_bundle_streams == 0).await);
}

#[tokio::test]
async fn call_errors_are_classified() {
    let fake = FakeAgent::start().await.unwrap();
    let api = api();

    fake.set_call_error(
        WorkloadKey::Pid(99),
        Some((Code::Unavailable, "workload attestation failed")),
    );
    let err = api
        .subscribe_svids(fake.path(), &Workload::Pid(99))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert_eq!(err.kind(), "unavailable");
    assert!(err.is_retryable());

    // The agent refusing the daemon itself: classified, with SPIRE's words kept and the
    // remedy said.
    for (refusal, words, remedy) in [
        (
            DelegateRefusal::NotAuthorized,
            "caller not configured as an authorized delegate",
            "authorized_delegates",
        ),
        (
            DelegateRefusal::NoEntry,
            "no identity issued",
            "registration entry",
        ),
    ] {
        fake.refuse_delegate(Some(refusal));
        let err = api
            .subscribe_svids(fake.path(), &Workload::Pid(1))
            .await
            .err()
            .unwrap();
        assert_eq!(err.refusal(), Some(refusal), "{err:?}");
        assert_eq!(err.kind(), refusal.kind());
        assert_eq!(err.code(), Some(Code::PermissionDenied));
        assert!(!err.is_retryable());
        let text = err.to_string();
        assert!(text.contains(words) && text.contains(remedy), "{text}");
        let err = api.subscribe_bundles(fake.path()).await.err().unwrap();
        assert_eq!(err.refusal(), Some(refusal));
        let err = api.probe(fake.path()).await.unwrap_err();
        assert_eq!(err.refusal(), Some(refusal), "the probe tells: {err:?}");
    }
    fake.refuse_delegate(None);
    api.probe(fake.path()).await.unwrap();

    // Any other PermissionDenied stays a plain status.
    fake.set_deny_all(Some((Code::PermissionDenied, "something else")));
    let err = api.subscribe_bundles(fake.path()).await.err().unwrap();
    assert!(
        matches!(&err, SourceError::Status { code: Code::PermissionDenied, message } if message == "something else")
    );
    assert_eq!(err.kind(), "permission_denied");
    assert!(!err.is_retryable());
    fake.set_deny_all(None);

    // Malformed selectors reach the agent and come back as InvalidArgument.
    let err = api
        .subscribe_svids(fake.path(), &selectors(&["k8s:ns:a"]).with_extra("", "x"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(!err.is_retryable());

    // PID 0 never leaves the process.
    let before = fake.stats().svid_subscriptions.len();
    let err = api
        .subscribe_svids(fake.path(), &Workload::Pid(0))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, SourceError::InvalidWorkload(_)));
    assert_eq!(fake.stats().svid_subscriptions.len(), before);
}

trait WithExtra {
    fn with_extra(self, kind: &str, value: &str) -> Workload;
}

impl WithExtra for Workload {
    fn with_extra(self, kind: &str, value: &str) -> Workload {
        match self {
            Workload::Selectors(mut s) => {
                s.push(Selector::new(kind, value));
                Workload::Selectors(s)
            }
            pid => pid,
        }
    }
}

/// The fake's argument checks, through the raw generated client (our client cannot send
/// these requests).
#[tokio::test]
async fn fake_checks_arguments_like_the_agent() {
    use super::proto::api::agent::delegatedidentity::v1::{
        SubscribeToX509sviDsRequest, delegated_identity_client::DelegatedIdentityClient,
    };
    use super::proto::api::types;

    let fake = FakeAgent::start().await.unwrap();
    let path = fake.path().to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .unwrap();
    let mut client = DelegatedIdentityClient::new(channel);
    let selector = types::Selector {
        r#type: "unix".into(),
        value: "uid:0".into(),
    };
    for (pid, selectors) in [
        (0, vec![]),
        (12, vec![selector.clone()]),
        (
            0,
            vec![types::Selector {
                r#type: "k8s:ns".into(),
                value: "a".into(),
            }],
        ),
    ] {
        let status = client
            .subscribe_to_x509svi_ds(SubscribeToX509sviDsRequest { selectors, pid })
            .await
            .err()
            .unwrap();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
}

#[tokio::test]
async fn stream_failures_end_the_stream() {
    let fake = FakeAgent::start().await.unwrap();
    let api = api();
    let mut a = subscribe(&api, fake.path(), &Workload::Pid(3)).await;
    let mut b = tokio::time::timeout(WAIT, api.subscribe_bundles(fake.path()))
        .await
        .unwrap()
        .unwrap();
    next(&mut a).await.unwrap();
    next(&mut b).await.unwrap();

    fake.fail_streams(Code::Internal, "could not serialize response");
    let err = next(&mut a).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Internal));
    assert!(err.is_retryable());
    assert!(a.next().await.is_none());
    assert_eq!(next(&mut b).await.unwrap_err().code(), Some(Code::Internal));

    let mut c = subscribe(&api, fake.path(), &Workload::Pid(3)).await;
    next(&mut c).await.unwrap();
    fake.close_streams();
    let err = next(&mut c).await.unwrap_err();
    assert!(matches!(err, SourceError::StreamEnded));
    assert!(err.is_retryable());
    assert_eq!(err.kind(), "stream_ended");
    assert!(c.next().await.is_none());
}

#[tokio::test]
async fn agent_restart_fails_open_streams_retryably_and_resubscribing_works() {
    let fake = FakeAgent::start().await.unwrap();
    let ca = TestCa::new("example.org").unwrap();
    fake.set_svids(
        WorkloadKey::Pid(11),
        update(vec![ca.mint("/w", TTL).unwrap()]),
    );
    let api = api();
    let mut svids = subscribe(&api, fake.path(), &Workload::Pid(11)).await;
    let mut bundles = api.subscribe_bundles(fake.path()).await.unwrap();
    next(&mut svids).await.unwrap();
    next(&mut bundles).await.unwrap();

    fake.stop();
    let err = next(&mut svids).await.unwrap_err();
    assert!(matches!(err, SourceError::Disconnected(_)), "{err:?}");
    assert!(err.is_retryable(), "{err:?} ({})", err.kind());
    assert_eq!(err.kind(), "disconnected");
    let err = next(&mut bundles).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?} ({})", err.kind());

    // While it is down: a bounded, retryable failure.
    let started = Instant::now();
    let err = api
        .subscribe_svids(fake.path(), &Workload::Pid(11))
        .await
        .err()
        .unwrap();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(err.kind(), "connect", "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(api.probe(fake.path()).await.is_err());

    // Back up: the same source subscribes again (a new SVID, as after a real restart).
    fake.resume().unwrap();
    let fresh = ca.mint("/w", TTL).unwrap();
    fake.set_svids(WorkloadKey::Pid(11), update(vec![fresh.clone()]));
    api.probe(fake.path()).await.unwrap();
    let mut again = subscribe(&api, fake.path(), &Workload::Pid(11)).await;
    assert_eq!(next(&mut again).await.unwrap().svids, vec![fresh]);
}

#[tokio::test]
async fn open_streams_end_when_the_agent_starts_refusing_the_daemon() {
    let fake = FakeAgent::start().await.unwrap();
    let ca = TestCa::new("example.org").unwrap();
    fake.set_svids(
        WorkloadKey::Pid(8),
        update(vec![ca.mint("/w", TTL).unwrap()]),
    );
    fake.set_bundle(&ca.trust_domain_id(), &[ca.cert_der().to_vec()]);
    let api = api();
    let mut svids = subscribe(&api, fake.path(), &Workload::Pid(8)).await;
    next(&mut svids).await.unwrap();
    let mut bundles = api.subscribe_bundles(fake.path()).await.unwrap();
    next(&mut bundles).await.unwrap();
    fake.refuse_delegate(Some(DelegateRefusal::NotAuthorized));
    for err in [
        next(&mut svids).await.unwrap_err(),
        next(&mut bundles).await.unwrap_err(),
    ] {
        assert_eq!(
            err.refusal(),
            Some(DelegateRefusal::NotAuthorized),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn a_quick_restart_needs_no_failed_call_to_reconnect() {
    let fake = FakeAgent::start().await.unwrap();
    let api = api();
    let mut stream = subscribe(&api, fake.path(), &Workload::Pid(4)).await;
    next(&mut stream).await.unwrap();
    fake.restart().unwrap();
    assert!(next(&mut stream).await.unwrap_err().is_retryable());
    // The cached connection is dead, but the next call redials by itself.
    let mut again = subscribe(&api, fake.path(), &Workload::Pid(4)).await;
    next(&mut again).await.unwrap();
    assert_eq!(fake.stats().connections, 2);
}

#[tokio::test]
async fn missing_socket_is_a_prompt_retryable_connect_error() {
    let dir = std::env::temp_dir().join(format!("nri-no-agent-{}", std::process::id()));
    let path = dir.join("admin.sock");
    let api = api();
    let started = Instant::now();
    let err = api
        .subscribe_svids(&path, &Workload::Pid(1))
        .await
        .err()
        .unwrap();
    assert!(matches!(&err, SourceError::Connect { path: p, .. } if *p == path));
    assert!(err.is_retryable());
    assert_eq!(err.kind(), "connect");
    let err = api.subscribe_bundles(&path).await.err().unwrap();
    assert_eq!(err.kind(), "connect");
    let err = api.probe(&path).await.unwrap_err();
    assert_eq!(err.kind(), "connect");
    assert!(err.to_string().contains("admin.sock"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Documents a limit rather than a feature: HTTP/2 setup does not wait for the server, so a
/// socket that accepts but never speaks (a hung agent) yields a channel, and the call then
/// waits until the caller's own timeout.
#[tokio::test]
async fn a_mute_listener_needs_the_callers_timeout() {
    let dir = std::env::temp_dir().join(format!("nri-mute-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("admin.sock");
    let _ = std::fs::remove_file(&path);
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let api = api();
    let result = tokio::time::timeout(
        Duration::from_millis(700),
        api.subscribe_svids(&path, &Workload::Pid(1)),
    )
    .await;
    assert!(result.is_err(), "still waiting when the caller gives up");
    // The probe makes a real call with its own bound, so it tells a mute agent (a frozen one)
    // from one that answers.
    let err = api.probe(&path).await.unwrap_err();
    assert_eq!(err.kind(), "connect", "{err:?}");
    assert!(err.is_retryable());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_call_resolves_with_the_first_message() {
    let fake = FakeAgent::start().await.unwrap();
    fake.set_initial_delay(Duration::from_millis(300));
    let api = api();
    let started = Instant::now();
    let mut stream = subscribe(&api, fake.path(), &Workload::Pid(2)).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The first message is already there.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), stream.next())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn messages_over_the_grpc_default_limit_are_accepted() {
    let fake = FakeAgent::start().await.unwrap();
    let ca = TestCa::new("example.org").unwrap();
    let mut big = ca.mint("/big", TTL).unwrap();
    // The source does not parse certificates, so padding stands in for thousands of SVIDs.
    big.cert_chain.push(vec![0x30; 6 << 20]);
    fake.set_svids(WorkloadKey::Pid(3), update(vec![big.clone()]));
    let api = api();
    let mut stream = subscribe(&api, fake.path(), &Workload::Pid(3)).await;
    assert_eq!(next(&mut stream).await.unwrap().svids, vec![big]);

    let small = DelegatedIdentityApi::new(ApiConfig {
        max_decoding_message_size: 1 << 20,
        ..ApiConfig::default()
    });
    let mut stream = subscribe(&small, fake.path(), &Workload::Pid(3)).await;
    let err = next(&mut stream).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::OutOfRange));
    assert!(!err.is_retryable());
}

#[test]
fn error_classification() {
    let status = |code| SourceError::from(tonic::Status::new(code, "x"));
    for code in [
        Code::Unavailable,
        Code::Unknown,
        Code::Internal,
        Code::DeadlineExceeded,
        Code::Cancelled,
        Code::Aborted,
        Code::ResourceExhausted,
    ] {
        assert!(status(code).is_retryable(), "{code:?}");
    }
    for code in [
        Code::InvalidArgument,
        Code::PermissionDenied,
        Code::Unauthenticated,
        Code::Unimplemented,
        Code::OutOfRange,
        Code::NotFound,
        Code::FailedPrecondition,
    ] {
        assert!(!status(code).is_retryable(), "{code:?}");
    }
    assert_eq!(status(Code::Unauthenticated).kind(), "unauthenticated");
    assert_eq!(status(Code::DeadlineExceeded).kind(), "deadline_exceeded");
    assert!(SourceError::StreamEnded.is_retryable());
    assert!(!SourceError::InvalidWorkload("x").is_retryable());
}

#[test]
fn selectors_parse_and_print() {
    let s: Selector = "k8s:pod-label:app:web".parse().unwrap();
    assert_eq!(s, Selector::new("k8s", "pod-label:app:web"));
    assert_eq!(s.to_string(), "k8s:pod-label:app:web");
    for bad in ["", "k8s", ":x", "k8s:"] {
        assert!(bad.parse::<Selector>().is_err(), "{bad}");
    }
}

#[tokio::test]
async fn fetches_jwt_svids_for_the_audience_and_follows_jwt_bundles() {
    let fake = FakeAgent::start().await.unwrap();
    let ca = TestCa::new("example.org").unwrap();
    let mut svid = ca.mint("/workload/j", TTL).unwrap();
    svid.hint = "internal".into();
    fake.set_svids(WorkloadKey::Pid(4343), update(vec![svid]));
    fake.set_jwt_ttl(Duration::from_secs(120));
    fake.set_jwt_bundle("spiffe://example.org", br#"{"keys":[{"kid":"a"}]}"#);
    let api = api();
    let audience = vec!["api".to_owned(), "db".to_owned()];

    let tokens = api
        .fetch_jwt_svids(fake.path(), &Workload::Pid(4343), &audience)
        .await
        .unwrap();
    let [token] = <[_; 1]>::try_from(tokens).expect("one token per identity");
    assert_eq!(token.spiffe_id.as_str(), "spiffe://example.org/workload/j");
    assert_eq!(token.hint, "internal");
    assert_eq!(token.expires_at - token.issued_at, 120);
    assert_eq!(token.token.split('.').count(), 3);
    assert_eq!(fake.stats().jwt_fetches, std::slice::from_ref(&audience));
    // A workload without entries gets no token, not an error.
    let none = api
        .fetch_jwt_svids(fake.path(), &Workload::Pid(1), &audience)
        .await
        .unwrap();
    assert!(none.is_empty());

    let mut bundles = api.subscribe_jwt_bundles(fake.path()).await.unwrap();
    let first = next(&mut bundles).await.unwrap();
    let td = TrustDomain::parse("example.org").unwrap();
    assert_eq!(first.bundles[&td], br#"{"keys":[{"kid":"a"}]}"#);
    fake.set_jwt_bundle("spiffe://example.org", br#"{"keys":[{"kid":"b"}]}"#);
    let second = next(&mut bundles).await.unwrap();
    assert_eq!(second.bundles[&td], br#"{"keys":[{"kid":"b"}]}"#);
    // A malformed JWKS ends the stream with a retryable decode error.
    fake.set_jwt_bundle("spiffe://example.org", b"not json");
    let err = next(&mut bundles).await.unwrap_err();
    assert_eq!(err.kind(), "decode");
    assert!(err.is_retryable());

    fake.set_jwt_error(Some((Code::Unavailable, "minting failed")));
    let err = api
        .fetch_jwt_svids(fake.path(), &Workload::Pid(4343), &audience)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable));
}
