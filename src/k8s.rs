//! The one piece of pod metadata Kubernetes selectors need that CRI and NRI do not carry:
//! the pod's service account, looked up by pod UID in the kubelet's pod list.
//!
//! The kubelet's read-only port (`/pods`, plain HTTP on a node-local address) is what
//! SPIRE's own k8s attestor commonly uses; the lookup speaks just enough HTTP/1.1 for that
//! one GET (including chunked responses) rather than pulling in an HTTP client stack.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use nri_identity_backends::k8s::OwnerReference;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Largest pod list accepted (a node with hundreds of pods stays far below).
const MAX_BODY: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot reach the kubelet at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the kubelet at {addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("the kubelet at {addr} answered {status}")]
    Status { addr: SocketAddr, status: String },
    #[error("unreadable pod list from the kubelet at {addr}: {reason}")]
    Malformed { addr: SocketAddr, reason: String },
    #[error("pod {uid} is not in the kubelet's pod list")]
    UnknownPod { uid: String },
}

#[derive(Debug, Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Debug, Deserialize)]
struct Pod {
    metadata: Meta,
    #[serde(default)]
    spec: Spec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    owner_references: Vec<Owner>,
}

#[derive(Debug, Deserialize)]
struct Owner {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    uid: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    service_account_name: String,
    #[serde(default)]
    node_name: String,
    #[serde(default)]
    ephemeral_containers: Vec<Named>,
}

#[derive(Debug, Deserialize)]
struct Named {
    #[serde(default)]
    name: String,
}

/// What the kubelet knows about a pod that selectors need and NRI does not carry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodFacts {
    /// Empty for static pods, which cannot name one.
    pub service_account: String,
    pub node_name: String,
    /// The pod's own labels (NRI's sandbox labels also hold the runtime's and the pause
    /// image's).
    pub labels: BTreeMap<String, String>,
    pub owners: Vec<OwnerReference>,
    /// Debug containers: the attestor never gives them selectors, so neither do we.
    pub ephemeral_containers: Vec<String>,
}

struct Cache {
    pods: HashMap<String, PodFacts>,
    fetched: Option<Instant>,
}

/// Service-account lookups against the kubelet, with a small cache refreshed on a miss.
pub struct KubeletPods {
    addr: SocketAddr,
    timeout: Duration,
    /// A miss refreshes the list at most this often, so a pod the kubelet does not know
    /// cannot make every event hit the kubelet.
    min_refresh: Duration,
    cache: Mutex<Cache>,
    refresh: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for KubeletPods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletPods")
            .field("addr", &self.addr)
            .finish()
    }
}

impl KubeletPods {
    pub fn new(addr: SocketAddr) -> Self {
        KubeletPods {
            addr,
            timeout: Duration::from_millis(500),
            min_refresh: Duration::from_millis(200),
            cache: Mutex::new(Cache {
                pods: HashMap::new(),
                fetched: None,
            }),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn cached(&self, uid: &str) -> Option<PodFacts> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pods
            .get(uid)
            .cloned()
    }

    /// The facts of pod `uid`, from the cache or a fresh pod list.
    pub async fn pod(&self, uid: &str) -> Result<PodFacts, LookupError> {
        if let Some(f) = self.cached(uid) {
            return Ok(f);
        }
        let _one_at_a_time = self.refresh.lock().await;
        if let Some(f) = self.cached(uid) {
            return Ok(f);
        }
        let recent = {
            let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            c.fetched.is_some_and(|t| t.elapsed() < self.min_refresh)
        };
        if recent {
            tokio::time::sleep(self.min_refresh).await;
        }
        let pods = tokio::time::timeout(self.timeout, self.fetch())
            .await
            .map_err(|_| LookupError::Timeout {
                addr: self.addr,
                timeout: self.timeout,
            })??;
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.pods = pods;
        c.fetched = Some(Instant::now());
        c.pods
            .get(uid)
            .cloned()
            .ok_or_else(|| LookupError::UnknownPod {
                uid: uid.to_owned(),
            })
    }

    /// Forgets a pod (on RemovePodSandbox).
    pub fn forget(&self, uid: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pods
            .remove(uid);
    }

    async fn fetch(&self) -> Result<HashMap<String, PodFacts>, LookupError> {
        let addr = self.addr;
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|source| LookupError::Connect { addr, source })?;
        let request = format!(
            "GET /pods HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|source| LookupError::Connect { addr, source })?;
        let mut raw = Vec::new();
        (&mut stream)
            .take(MAX_BODY as u64 + 64 * 1024)
            .read_to_end(&mut raw)
            .await
            .map_err(|source| LookupError::Connect { addr, source })?;
        let malformed = |reason: &str| LookupError::Malformed {
            addr,
            reason: reason.to_owned(),
        };
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| malformed("no end of headers"))?;
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let body = &raw[split + 4..];
        let status = head.lines().next().unwrap_or("");
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(LookupError::Status {
                addr,
                status: status.to_owned(),
            });
        }
        let chunked = head.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("transfer-encoding:") && l.contains("chunked")
        });
        let body = if chunked {
            dechunk(body).ok_or_else(|| malformed("bad chunked encoding"))?
        } else {
            body.to_vec()
        };
        let list: PodList = serde_json::from_slice(&body).map_err(|e| malformed(&e.to_string()))?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| !p.metadata.uid.is_empty())
            .map(|p| {
                let facts = PodFacts {
                    service_account: p.spec.service_account_name,
                    node_name: p.spec.node_name,
                    labels: p.metadata.labels,
                    owners: p
                        .metadata
                        .owner_references
                        .into_iter()
                        .map(|o| OwnerReference {
                            kind: o.kind,
                            name: o.name,
                            uid: o.uid,
                        })
                        .collect(),
                    ephemeral_containers: p
                        .spec
                        .ephemeral_containers
                        .into_iter()
                        .map(|c| c.name)
                        .collect(),
                };
                (p.metadata.uid, facts)
            })
            .collect())
    }
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if body.len() < size + 2 || out.len() + size > MAX_BODY {
            return None;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A fake kubelet `/pods`: answers with whatever the shared body says, optionally late,
    /// optionally chunked, counting requests.
    async fn fake_kubelet(
        body: Arc<Mutex<(u16, String)>>,
        delay: Duration,
        chunked: bool,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let (body, hits) = (body.clone(), h.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    hits.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    let (code, text) = body.lock().unwrap().clone();
                    let response = if chunked {
                        let (a, b) = text.split_at(text.len() / 2);
                        format!(
                            "HTTP/1.1 {code} X\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                            a.len(),
                            b.len()
                        )
                    } else {
                        format!(
                            "HTTP/1.1 {code} X\r\nContent-Length: {}\r\n\r\n{text}",
                            text.len()
                        )
                    };
                    let _ = s.write_all(response.as_bytes()).await;
                });
            }
        });
        (addr, hits)
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
            let body = Arc::new(Mutex::new((200, pods(&[("u1", "web"), ("u2", "db")]))));
            let (addr, _) = fake_kubelet(body, Duration::ZERO, chunked).await;
            let k = KubeletPods::new(addr);
            let facts = k.pod("u2").await.unwrap();
            assert_eq!(
                (facts.service_account.as_str(), facts.node_name.as_str()),
                ("db", "n1"),
                "chunked={chunked}"
            );
        }
    }

    #[tokio::test]
    async fn a_pod_the_kubelet_does_not_know_is_a_clear_error() {
        let body = Arc::new(Mutex::new((200, pods(&[("u1", "web")]))));
        let (addr, _) = fake_kubelet(body, Duration::ZERO, false).await;
        let err = KubeletPods::new(addr).pod("nope").await.unwrap_err();
        assert!(matches!(err, LookupError::UnknownPod { .. }), "{err}");
        assert!(err.to_string().contains("nope"));
    }

    #[tokio::test]
    async fn a_slow_kubelet_times_out() {
        let body = Arc::new(Mutex::new((200, pods(&[("u1", "web")]))));
        let (addr, _) = fake_kubelet(body, Duration::from_secs(5), false).await;
        let k = KubeletPods::new(addr).with_timeout(Duration::from_millis(100));
        let t = Instant::now();
        assert!(matches!(
            k.pod("u1").await,
            Err(LookupError::Timeout { .. })
        ));
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn an_error_status_is_reported() {
        let body = Arc::new(Mutex::new((500, "boom".to_owned())));
        let (addr, _) = fake_kubelet(body, Duration::ZERO, false).await;
        let err = KubeletPods::new(addr).pod("u1").await.unwrap_err();
        assert!(matches!(err, LookupError::Status { .. }), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_kubelet_is_a_connect_error() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(matches!(
            KubeletPods::new(addr).pod("u1").await,
            Err(LookupError::Connect { .. })
        ));
    }

    #[tokio::test]
    async fn hits_are_cached_and_a_stale_cache_is_refreshed_on_a_miss() {
        let body = Arc::new(Mutex::new((200, pods(&[("u1", "web")]))));
        let (addr, hits) = fake_kubelet(body.clone(), Duration::ZERO, false).await;
        let k = KubeletPods::new(addr);
        k.pod("u1").await.unwrap();
        k.pod("u1").await.unwrap();
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "the second lookup is served from the cache"
        );
        // A new pod appears: the miss refreshes the list.
        *body.lock().unwrap() = (200, pods(&[("u1", "web"), ("u3", "new")]));
        assert_eq!(k.pod("u3").await.unwrap().service_account, "new");
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn chunked_bodies_decode_and_truncated_ones_are_refused() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n").as_deref(),
            Some(&b"abcde"[..])
        );
        assert_eq!(dechunk(b"5\r\nab"), None);
        assert_eq!(dechunk(b"zz\r\n"), None);
    }
}
