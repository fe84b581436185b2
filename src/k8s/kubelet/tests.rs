use super::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the fake kubelet answers `/pods`.
#[derive(Clone)]
struct Answer {
    status: u16,
    body: String,
    chunked: bool,
    /// Declared Content-Length minus the bytes actually sent (a cut response).
    short_by: usize,
    /// Sent as is instead of a response built from the fields above.
    raw: Option<String>,
}

impl Answer {
    fn ok(body: String) -> Self {
        Answer {
            status: 200,
            body,
            chunked: false,
            short_by: 0,
            raw: None,
        }
    }

    fn raw(response: &str) -> Self {
        Answer {
            raw: Some(response.to_owned()),
            ..Answer::ok(String::new())
        }
    }
}

/// A fake kubelet `/pods`, plain or TLS: answers with whatever `answer` says, optionally
/// late, recording each request's head.
struct FakeKubelet {
    port: u16,
    answer: Arc<Mutex<Answer>>,
    hits: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl FakeKubelet {
    async fn start(
        answer: Answer,
        delay: Duration,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> FakeKubelet {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let fake = FakeKubelet {
            port,
            answer: Arc::new(Mutex::new(answer)),
            hits: Arc::default(),
            heads: Arc::default(),
        };
        let (answer, hits, heads) = (fake.answer.clone(), fake.hits.clone(), fake.heads.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let (answer, hits, heads, tls) =
                    (answer.clone(), hits.clone(), heads.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => serve(s, &answer, &hits, &heads, delay).await,
                        Some(cfg) => {
                            // A failed handshake (bad client certificate) never reaches /pods.
                            if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(s).await {
                                serve(s, &answer, &hits, &heads, delay).await;
                            }
                        }
                    }
                });
            }
        });
        fake
    }

    fn url(&self, scheme: &str) -> KubeletUrl {
        format!("{scheme}://127.0.0.1:{}", self.port)
            .parse()
            .unwrap()
    }

    fn read_only(&self) -> KubeletPods {
        KubeletPods::new(Endpoint::read_only(self.url("http")))
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    answer: &Mutex<Answer>,
    hits: &AtomicUsize,
    heads: &Mutex<Vec<String>>,
    delay: Duration,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    heads
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(delay).await;
    let a = answer.lock().unwrap().clone();
    let text = &a.body;
    let response = if let Some(raw) = a.raw {
        raw
    } else if a.chunked {
        let (x, y) = text.split_at(text.len() / 2);
        format!(
            "HTTP/1.1 {} X\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{x}\r\n{:x}\r\n{y}\r\n0\r\n\r\n",
            a.status,
            x.len(),
            y.len()
        )
    } else {
        format!(
            "HTTP/1.1 {} X\r\nContent-Length: {}\r\n\r\n{}",
            a.status,
            text.len(),
            &text[..text.len() - a.short_by]
        )
    };
    let _ = s.write_all(response.as_bytes()).await;
    // No orderly shutdown: like a server that just closes, a TLS peer then sends no
    // close_notify, and the client must rely on the framing.
    let _ = s.flush().await;
}

fn pods(entries: &[(&str, &str)]) -> String {
    let items: Vec<String> = entries
        .iter()
        .map(|(uid, sa)| {
            format!(r#"{{"metadata":{{"uid":"{uid}","name":"p"}},"spec":{{"serviceAccountName":"{sa}","nodeName":"n1"}}}}"#)
        })
        .collect();
    format!(r#"{{"kind":"PodList","items":[{}]}}"#, items.join(","))
}

#[tokio::test]
async fn finds_the_service_account_of_a_known_pod() {
    for chunked in [false, true] {
        let answer = Answer {
            chunked,
            ..Answer::ok(pods(&[("u1", "web"), ("u2", "db")]))
        };
        let fake = FakeKubelet::start(answer, Duration::ZERO, None).await;
        let facts = fake.read_only().pod("u2").await.unwrap();
        assert_eq!(
            (facts.service_account.as_str(), facts.node_name.as_str()),
            ("db", "n1"),
            "chunked={chunked}"
        );
    }
}

#[tokio::test]
async fn nulls_where_go_writes_empty_lists_read_as_empty() {
    // What a real kubelet answers on a node without pods, and a pod with null fields.
    let fake = FakeKubelet::start(
        Answer::ok(r#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":null}"#.into()),
        Duration::ZERO,
        None,
    )
    .await;
    let k = fake.read_only();
    assert_eq!(k.refresh().await.unwrap(), 0);
    fake.set(Answer::ok(
        r#"{"items":[{"metadata":{"uid":"u1","labels":null,"ownerReferences":null},"spec":{"serviceAccountName":null,"nodeName":"n1","ephemeralContainers":null}}]}"#.into(),
    ));
    let facts = k.pod("u1").await.unwrap();
    assert_eq!(
        (
            facts.service_account.as_str(),
            facts.labels.len(),
            facts.owners.len()
        ),
        ("", 0, 0)
    );
}

#[tokio::test]
async fn each_containers_user_is_its_own_security_context_over_the_pods() {
    let fake = FakeKubelet::start(
        Answer::ok(
            r#"{"items":[{"metadata":{"uid":"u1"},"spec":{
                "securityContext":{"runAsUser":1000,"runAsGroup":2000},
                "containers":[
                    {"name":"inherits"},
                    {"name":"own","securityContext":{"runAsUser":1001,"runAsGroup":2001}},
                    {"name":"group-only","securityContext":{"runAsGroup":3000}},
                    {"name":"bogus","securityContext":{"runAsUser":-1}}],
                "initContainers":[{"name":"init","securityContext":{"runAsUser":1002}}]}},
              {"metadata":{"uid":"u2"},"spec":{"containers":[
                    {"name":"image-user","securityContext":null},
                    {"name":"uid-only","securityContext":{"runAsUser":1003}}]}}]}"#
                .into(),
        ),
        Duration::ZERO,
        None,
    )
    .await;
    let k = fake.read_only();
    let users = k.pod("u1").await.unwrap().users;
    assert_eq!(users.get("inherits"), Some(&(1000, 2000)));
    assert_eq!(users.get("own"), Some(&(1001, 2001)));
    assert_eq!(users.get("group-only"), Some(&(1000, 3000)));
    assert_eq!(users.get("init"), Some(&(1002, 2000)));
    assert_eq!(users.get("bogus"), None, "not a uid");
    let users = k.pod("u2").await.unwrap().users;
    assert_eq!(
        users.get("image-user"),
        None,
        "the image's USER is the runtime's to know"
    );
    assert_eq!(users.get("uid-only"), Some(&(1003, 0)));
}

#[tokio::test]
async fn a_pod_the_kubelet_does_not_know_is_a_clear_error() {
    let fake = FakeKubelet::start(Answer::ok(pods(&[("u1", "web")])), Duration::ZERO, None).await;
    let err = fake.read_only().pod("nope").await.unwrap_err();
    assert!(matches!(err, LookupError::UnknownPod { .. }), "{err}");
    assert!(err.to_string().contains("nope"));
}

#[tokio::test]
async fn a_slow_kubelet_times_out() {
    let answer = Answer::ok(pods(&[("u1", "web")]));
    let fake = FakeKubelet::start(answer, Duration::from_secs(5), None).await;
    let k = fake.read_only().with_timeout(Duration::from_millis(100));
    let t = Instant::now();
    assert!(matches!(
        k.pod("u1").await,
        Err(LookupError::Timeout { .. })
    ));
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn an_error_status_is_reported() {
    let answer = Answer {
        status: 500,
        ..Answer::ok("boom".into())
    };
    let fake = FakeKubelet::start(answer, Duration::ZERO, None).await;
    let err = fake.read_only().pod("u1").await.unwrap_err();
    assert!(matches!(err, LookupError::Status { .. }), "{err}");
}

#[tokio::test]
async fn a_cut_response_is_malformed_not_an_empty_pod_list() {
    let answer = Answer {
        short_by: 10,
        ..Answer::ok(pods(&[("u1", "web")]))
    };
    let fake = FakeKubelet::start(answer, Duration::ZERO, None).await;
    let err = fake.read_only().pod("u1").await.unwrap_err();
    assert!(matches!(err, LookupError::Malformed { .. }), "{err}");
}

#[tokio::test]
async fn an_unreachable_kubelet_is_a_connect_error() {
    let k = KubeletPods::new(Endpoint::read_only("http://127.0.0.1:1".parse().unwrap()));
    assert!(matches!(
        k.pod("u1").await,
        Err(LookupError::Connect { .. })
    ));
}

#[tokio::test]
async fn hits_are_cached_and_a_stale_cache_is_refreshed_on_a_miss() {
    let fake = FakeKubelet::start(Answer::ok(pods(&[("u1", "web")])), Duration::ZERO, None).await;
    let k = fake.read_only();
    k.pod("u1").await.unwrap();
    k.pod("u1").await.unwrap();
    assert_eq!(
        fake.hits.load(Ordering::SeqCst),
        1,
        "the second lookup is served from the cache"
    );
    // A new pod appears: the miss refreshes the list.
    fake.set(Answer::ok(pods(&[("u1", "web"), ("u3", "new")])));
    assert_eq!(k.pod("u3").await.unwrap().service_account, "new");
    assert_eq!(fake.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn every_pod_list_read_is_counted_with_its_bytes() {
    let first = pods(&[("u1", "web")]);
    let fake = FakeKubelet::start(Answer::ok(first.clone()), Duration::ZERO, None).await;
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let k = fake.read_only().with_metrics(metrics.clone());
    k.pod("u1").await.unwrap();
    k.pod("u1").await.unwrap();
    let second = pods(&[("u1", "web"), ("u3", "new")]);
    fake.set(Answer::ok(second.clone()));
    k.pod("u3").await.unwrap();
    metrics.set_kubelet_ready(true);
    let text = metrics.render(0);
    assert!(
        text.lines()
            .any(|l| l == "nri_identity_kubelet_pod_lists_total 2"),
        "a cache hit reads no list\n{text}"
    );
    let bytes = first.len() + second.len();
    assert!(
        text.lines()
            .any(|l| l == format!("nri_identity_kubelet_pod_list_bytes_total {bytes}")),
        "{text}"
    );
}

#[test]
fn chunked_bodies_decode_and_truncated_or_oversized_ones_are_refused() {
    assert_eq!(
        transport::dechunk(b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n", 100).as_deref(),
        Some(&b"abcde"[..])
    );
    assert_eq!(transport::dechunk(b"5\r\nab", 100), None);
    assert_eq!(transport::dechunk(b"zz\r\n", 100), None);
    assert_eq!(transport::dechunk(b"3\r\nabc\r\n0\r\n\r\n", 2), None);
    assert_eq!(
        transport::dechunk(b"ffffffffffffffff\r\nabc\r\n", 100),
        None,
        "a size near usize::MAX must not overflow"
    );
}

/// What the fake kubelet answers for `raw`, read with a 100-byte body limit.
async fn answer_to(raw: &str) -> Result<PodFacts, LookupError> {
    let fake = FakeKubelet::start(Answer::raw(raw), Duration::ZERO, None).await;
    let mut k = fake.read_only();
    k.max_body = 100;
    k.pod("u1").await
}

#[tokio::test]
async fn bad_framing_and_oversized_bodies_are_refused_as_malformed() {
    let big = "x".repeat(200);
    for (what, raw) in [
        (
            "a truncated chunk",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab".to_owned(),
        ),
        (
            "a chunk size that is not hexadecimal",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_owned(),
        ),
        (
            "a chunk size near u64::MAX",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc\r\n"
                .to_owned(),
        ),
        (
            "chunks over the limit",
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
                big.len()
            ),
        ),
        (
            "a Content-Length over the limit",
            "HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n{}".to_owned(),
        ),
        (
            "an unparsable Content-Length",
            "HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n{}".to_owned(),
        ),
        (
            "a close-delimited body over the limit",
            format!("HTTP/1.1 200 OK\r\n\r\n{big}"),
        ),
        ("no status line", "{\"items\":[]}\r\n\r\n".to_owned()),
        ("no end of headers", "HTTP/1.1 200 OK\r\n".to_owned()),
    ] {
        let err = answer_to(&raw).await.unwrap_err();
        assert!(
            matches!(err, LookupError::Malformed { .. }),
            "{what}: {err}"
        );
    }
}

#[test]
fn kubelet_urls_parse_with_scheme_defaults_and_refuse_paths_and_junk() {
    let u: KubeletUrl = "https://10.0.0.5".parse().unwrap();
    assert_eq!(
        (u.scheme, u.host.as_str(), u.port),
        (Scheme::Https, "10.0.0.5", 10250)
    );
    let u: KubeletUrl = "http://127.0.0.1:10255/".parse().unwrap();
    assert_eq!((u.scheme, u.port), (Scheme::Http, 10255));
    let u: KubeletUrl = "https://[fd00::5]:4443".parse().unwrap();
    assert_eq!((u.host.as_str(), u.port), ("fd00::5", 4443));
    assert_eq!(u.to_string(), "https://[fd00::5]:4443");
    let u: KubeletUrl = "https://node-1.example:10250".parse().unwrap();
    assert_eq!(u.authority(), "node-1.example:10250");
    for bad in [
        "10.0.0.5:10250",
        "ftp://h:1",
        "https://h:1/pods",
        "https://user@h:1",
        "https://h:0",
        "https://h:99999",
        "https://:10250",
        "https://[zz]:1",
        "https://h h:1",
        "https://h:1?x",
        // Found by the `config` fuzz target: a colon made any host pass as IPv6, and the
        // URL then printed as one that does not parse.
        "https://10.off0.0.5:1ff0.0.5:10250",
        "https://a:b:10250",
    ] {
        assert!(bad.parse::<KubeletUrl>().is_err(), "{bad} must be refused");
    }
    // An unbracketed IPv6 address still reads, its last group as the port.
    let u: KubeletUrl = "https://fd00::5:10250".parse().unwrap();
    assert_eq!((u.host.as_str(), u.port), ("fd00::5", 10250));
    for good in [
        "https://10.0.0.5",
        "http://127.0.0.1:10255/",
        "https://[fd00::5]:4443",
        "https://fd00::5:10250",
        "https://node-1.example:10250",
    ] {
        let u: KubeletUrl = good.parse().unwrap();
        assert_eq!(
            u.to_string().parse::<KubeletUrl>(),
            Ok(u),
            "{good} prints as it reads"
        );
    }
}

// --- the secure port -----------------------------------------------------------------------

/// A CA, a kubelet serving certificate for 127.0.0.1 and `localhost`, and a client
/// certificate, as PEM files in a temporary directory.
struct Pki {
    dir: PathBuf,
    ca: rustls::pki_types::CertificateDer<'static>,
    server_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    server_key: rustls::pki_types::PrivateKeyDer<'static>,
}

fn ca_params(name: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_owned());
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "nii-k8s-tls-{}-{tag}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca_params("kubelet-ca").self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        let ca = ca_cert.der().clone();
        let issuer = rcgen::Issuer::new(ca_params("kubelet-ca"), ca_key);

        let leaf = |sans: Vec<String>, cn: &str, usage: rcgen::ExtendedKeyUsagePurpose| {
            let mut p = rcgen::CertificateParams::new(sans).unwrap();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, cn.to_owned());
            p.extended_key_usages = vec![usage];
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &issuer).unwrap();
            (cert, key)
        };
        let (server, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "kubelet",
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client, client_key) = leaf(
            Vec::new(),
            "nri-identity-injector",
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        std::fs::write(dir.join("client.pem"), client.pem()).unwrap();
        std::fs::write(dir.join("client-key.pem"), client_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("token"), "sa-token-1\n").unwrap();
        Pki {
            dir,
            ca,
            server_chain: vec![server.der().clone()],
            server_key: rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The kubelet's TLS: optionally demanding a client certificate from this CA.
    fn server(&self, require_client_cert: bool) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.clone()).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(
            builder
                .with_single_cert(self.server_chain.clone(), self.server_key.clone_key())
                .unwrap(),
        )
    }

    fn token_settings(&self) -> TlsSettings {
        TlsSettings {
            ca: Some(self.path("ca.pem")),
            server_name: "127.0.0.1".into(),
            auth: ClientAuth::Token(self.path("token")),
        }
    }

    fn cert_settings(&self) -> TlsSettings {
        TlsSettings {
            auth: ClientAuth::Certificate {
                cert: self.path("client.pem"),
                key: self.path("client-key.pem"),
            },
            ..self.token_settings()
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn secure(pki: &Pki, require_client_cert: bool) -> FakeKubelet {
    let answer = Answer {
        chunked: true,
        ..Answer::ok(pods(&[("u1", "web")]))
    };
    FakeKubelet::start(
        answer,
        Duration::ZERO,
        Some(pki.server(require_client_cert)),
    )
    .await
}

fn on(fake: &FakeKubelet, tls: TlsSettings) -> KubeletPods {
    KubeletPods::new(Endpoint {
        url: fake.url("https"),
        tls: Some(tls),
    })
}

fn bearer_of(head: &str) -> Option<&str> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("authorization")
            .then(|| value.trim().strip_prefix("Bearer "))?
    })
}

#[tokio::test]
async fn the_secure_port_is_asked_over_verified_tls_with_the_current_token() {
    let pki = Pki::new("token");
    let fake = secure(&pki, false).await;
    let k = on(&fake, pki.token_settings());
    assert_eq!(k.pod("u1").await.unwrap().service_account, "web");
    // The kubelet rotates projected tokens in place: the next connection sends the new one.
    std::fs::write(pki.path("token"), "sa-token-2").unwrap();
    fake.set(Answer::ok(pods(&[("u1", "web"), ("u2", "db")])));
    assert_eq!(k.pod("u2").await.unwrap().service_account, "db");
    let heads = fake.heads.lock().unwrap().clone();
    let tokens: Vec<_> = heads.iter().map(|h| bearer_of(h)).collect();
    assert_eq!(tokens, [Some("sa-token-1"), Some("sa-token-2")]);
}

#[tokio::test]
async fn a_client_certificate_authenticates_without_a_token() {
    let pki = Pki::new("cert");
    let fake = secure(&pki, true).await;
    let k = on(&fake, pki.cert_settings());
    assert_eq!(k.pod("u1").await.unwrap().service_account, "web");
    let heads = fake.heads.lock().unwrap().clone();
    assert_eq!(bearer_of(&heads[0]), None, "no token next to a certificate");

    // Without the certificate the same kubelet refuses the handshake.
    let err = on(&fake, pki.token_settings()).pod("u1").await.unwrap_err();
    assert!(
        matches!(err, LookupError::Tls { .. } | LookupError::Connect { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_kubelet_certificate_from_another_ca_is_refused_unless_verification_is_skipped() {
    let pki = Pki::new("server");
    let other = Pki::new("other");
    let fake = secure(&pki, false).await;
    let wrong_ca = TlsSettings {
        ca: Some(other.path("ca.pem")),
        ..pki.token_settings()
    };
    let err = on(&fake, wrong_ca).pod("u1").await.unwrap_err();
    assert!(matches!(err, LookupError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("kubelet_ca_path"), "{err}");
    assert_eq!(
        fake.hits.load(Ordering::SeqCst),
        0,
        "the token never reached an unverified peer"
    );

    let skip = TlsSettings {
        ca: None,
        ..pki.token_settings()
    };
    assert_eq!(
        on(&fake, skip).pod("u1").await.unwrap().service_account,
        "web"
    );
}

#[tokio::test]
async fn a_serving_certificate_for_another_name_is_refused() {
    let pki = Pki::new("name");
    let fake = secure(&pki, false).await;
    let tls = TlsSettings {
        server_name: "node-7.example".into(),
        ..pki.token_settings()
    };
    let err = on(&fake, tls).pod("u1").await.unwrap_err();
    assert!(matches!(err, LookupError::Tls { .. }), "{err}");
}

#[tokio::test]
async fn rejected_credentials_say_what_to_check() {
    let pki = Pki::new("401");
    let fake = secure(&pki, false).await;
    fake.set(Answer {
        status: 401,
        ..Answer::ok("Unauthorized".into())
    });
    let err = on(&fake, pki.token_settings()).pod("u1").await.unwrap_err();
    assert!(
        err.to_string().contains("token or client certificate"),
        "{err}"
    );
    fake.set(Answer {
        status: 403,
        ..Answer::ok("Forbidden".into())
    });
    let err = on(&fake, pki.token_settings()).pod("u1").await.unwrap_err();
    assert!(err.to_string().contains("nodes/proxy"), "{err}");
}

fn credential_error(tls: &TlsSettings) -> String {
    let e = Endpoint {
        url: "https://127.0.0.1:1".parse().unwrap(),
        tls: Some(tls.clone()),
    };
    e.check().unwrap_err().to_string()
}

#[test]
fn unusable_credentials_are_named_by_their_setting_at_startup() {
    let pki = Pki::new("creds");
    let good = pki.cert_settings();
    assert!(
        Endpoint {
            url: "https://127.0.0.1:1".parse().unwrap(),
            tls: Some(good.clone())
        }
        .check()
        .is_ok()
    );
    let missing = Path::new("/nonexistent/ca.pem").to_owned();
    let e = credential_error(&TlsSettings {
        ca: Some(missing),
        ..good.clone()
    });
    assert!(e.starts_with("kubelet_ca_path /nonexistent/ca.pem"), "{e}");

    std::fs::write(pki.path("empty"), "").unwrap();
    let e = credential_error(&TlsSettings {
        ca: Some(pki.path("empty")),
        ..good.clone()
    });
    assert!(
        e.contains("kubelet_ca_path") && e.contains("no PEM certificate"),
        "{e}"
    );

    let e = credential_error(&TlsSettings {
        auth: ClientAuth::Certificate {
            cert: pki.path("client.pem"),
            key: pki.path("ca.pem"),
        },
        ..good.clone()
    });
    assert!(e.contains("kubelet_private_key_path"), "{e}");

    std::fs::write(pki.path("bad-token"), "abc\r\nX-Evil: 1").unwrap();
    let e = credential_error(&TlsSettings {
        auth: ClientAuth::Token(pki.path("bad-token")),
        ..good.clone()
    });
    assert!(
        e.contains("kubelet_token_path") && e.contains("cannot have"),
        "{e}"
    );

    std::fs::write(pki.path("blank-token"), "\n").unwrap();
    let e = credential_error(&TlsSettings {
        auth: ClientAuth::Token(pki.path("blank-token")),
        ..good.clone()
    });
    assert!(e.contains("is empty"), "{e}");

    let e = credential_error(&TlsSettings {
        server_name: "not a name".into(),
        ..good
    });
    assert!(e.contains("kubelet_server_name"), "{e}");
}
