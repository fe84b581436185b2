//! The kubelet's pod list: the facts selectors need that CRI and NRI do not carry (the pod's
//! service account, owners and own labels), looked up by pod UID.
//!
//! The kubelet is asked on its secure port (TLS, authenticated by the daemon's
//! service-account token or a client certificate) or its read-only port, as SPIRE's own
//! k8s attestor does. Just enough HTTP/1.1 for that one GET is spoken here
//! ([`transport`]) rather than pulling in an HTTP client stack.

mod transport;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::attestor::OwnerReference;
use crate::metrics::Metrics;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use transport::{ClientAuth, CredentialError, Endpoint, KubeletUrl, Scheme, TlsSettings};

/// Largest pod list accepted (a node with hundreds of pods stays far below).
const MAX_BODY: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("cannot talk to the kubelet at {url}: {error}")]
    Connect { url: String, error: std::io::Error },
    #[error(
        "TLS with the kubelet at {url} failed (see kubelet_ca_path, kubelet_server_name): {error}"
    )]
    Tls { url: String, error: std::io::Error },
    #[error("kubelet credentials: {0}")]
    Credentials(CredentialError),
    #[error("the kubelet at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("the kubelet at {url} answered {status}{hint}")]
    Status {
        url: String,
        status: String,
        hint: &'static str,
    },
    #[error("unreadable pod list from the kubelet at {url}: {reason}")]
    Malformed { url: String, reason: String },
    #[error("pod {uid} is not in the kubelet's pod list")]
    UnknownPod { uid: String },
}

impl From<CredentialError> for LookupError {
    fn from(e: CredentialError) -> Self {
        LookupError::Credentials(e)
    }
}

#[derive(Debug, Deserialize)]
struct PodList {
    #[serde(default, deserialize_with = "nullable")]
    items: Vec<Pod>,
}

#[derive(Debug, Deserialize)]
struct Pod {
    metadata: Meta,
    #[serde(default, deserialize_with = "nullable")]
    spec: Spec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default, deserialize_with = "nullable")]
    uid: String,
    #[serde(default, deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    owner_references: Vec<Owner>,
}

#[derive(Debug, Deserialize)]
struct Owner {
    #[serde(default, deserialize_with = "nullable")]
    kind: String,
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    uid: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default, deserialize_with = "nullable")]
    service_account_name: String,
    #[serde(default, deserialize_with = "nullable")]
    node_name: String,
    #[serde(default, deserialize_with = "nullable")]
    ephemeral_containers: Vec<Named>,
    #[serde(default, deserialize_with = "nullable")]
    security_context: RunAs,
    #[serde(default, deserialize_with = "nullable")]
    containers: Vec<SpecContainer>,
    #[serde(default, deserialize_with = "nullable")]
    init_containers: Vec<SpecContainer>,
}

/// The user and group of a pod's or a container's `securityContext`.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RunAs {
    #[serde(default)]
    run_as_user: Option<i64>,
    #[serde(default)]
    run_as_group: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecContainer {
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    security_context: RunAs,
}

impl Spec {
    /// Each container's uid and gid as the spec sets them, the container's `securityContext`
    /// over the pod's; only containers whose uid the spec sets. Without `runAsGroup` the
    /// runtime takes the group from the image, which the kubelet does not know: the group
    /// stays 0 then (the files are still the uid's).
    fn users(&self) -> BTreeMap<String, (u32, u32)> {
        let id = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok());
        self.containers
            .iter()
            .chain(&self.init_containers)
            .filter_map(|c| {
                let uid = id(c
                    .security_context
                    .run_as_user
                    .or(self.security_context.run_as_user))?;
                let gid = id(c
                    .security_context
                    .run_as_group
                    .or(self.security_context.run_as_group))
                .unwrap_or(0);
                Some((c.name.clone(), (uid, gid)))
            })
            .collect()
    }
}

#[derive(Debug, Deserialize)]
struct Named {
    #[serde(default, deserialize_with = "nullable")]
    name: String,
}

/// Go's JSON encoder writes empty slices and maps as `null` (the kubelet's `"items":null`
/// for a node without pods): read `null` as empty, like an absent field.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
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
    /// Container name to the uid and gid its spec sets (`runAsUser`, `runAsGroup`), for
    /// runtimes that do not report a container's user through NRI.
    pub users: BTreeMap<String, (u32, u32)>,
}

struct Cache {
    pods: HashMap<String, PodFacts>,
    fetched: Option<Instant>,
}

/// Service-account lookups against the kubelet, with a small cache refreshed on a miss.
pub struct KubeletPods {
    endpoint: Endpoint,
    timeout: Duration,
    /// A miss refreshes the list at most this often, so a pod the kubelet does not know
    /// cannot make every event hit the kubelet.
    min_refresh: Duration,
    /// Largest pod list accepted.
    max_body: usize,
    cache: Mutex<Cache>,
    refresh: tokio::sync::Mutex<()>,
    /// Where each pod list read is counted, when the daemon exports metrics.
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for KubeletPods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletPods")
            .field("url", &self.endpoint.url)
            .finish()
    }
}

impl KubeletPods {
    pub fn new(endpoint: Endpoint) -> Self {
        KubeletPods {
            endpoint,
            timeout: Duration::from_millis(500),
            min_refresh: Duration::from_millis(200),
            max_body: MAX_BODY,
            cache: Mutex::new(Cache {
                pods: HashMap::new(),
                fetched: None,
            }),
            refresh: tokio::sync::Mutex::new(()),
            metrics: None,
        }
    }

    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn url(&self) -> &KubeletUrl {
        &self.endpoint.url
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
        let last = self.cache.lock().unwrap_or_else(|p| p.into_inner()).fetched;
        if let Some(last) = last {
            tokio::time::sleep_until(last + self.min_refresh).await;
        }
        self.fetch_into_cache().await?;
        self.cached(uid).ok_or_else(|| LookupError::UnknownPod {
            uid: uid.to_owned(),
        })
    }

    /// Lists the node's pods now, replacing the cache: the readiness probe, which also
    /// drops pods that are gone.
    pub async fn refresh(&self) -> Result<usize, LookupError> {
        let _one_at_a_time = self.refresh.lock().await;
        self.fetch_into_cache().await
    }

    async fn fetch_into_cache(&self) -> Result<usize, LookupError> {
        let asked = Instant::now();
        let (pods, bytes) = tokio::time::timeout(self.timeout, self.fetch())
            .await
            .map_err(|_| LookupError::Timeout {
                url: self.endpoint.url.to_string(),
                timeout: self.timeout,
            })??;
        let n = pods.len();
        if let Some(m) = &self.metrics {
            m.kubelet_list_fetched(bytes);
        }
        tracing::debug!(url = %self.endpoint.url, pods = n, bytes, elapsed_ms = asked.elapsed().as_secs_f64() * 1e3, "kubelet pod list fetched");
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.pods = pods;
        c.fetched = Some(Instant::now());
        Ok(n)
    }

    /// Forgets a pod (on RemovePodSandbox).
    pub fn forget(&self, uid: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pods
            .remove(uid);
    }

    /// The node's pods and the length of the list they came in.
    async fn fetch(&self) -> Result<(HashMap<String, PodFacts>, usize), LookupError> {
        let url = &self.endpoint.url;
        let authority = url.authority();
        let connect = |error| LookupError::Connect {
            url: url.to_string(),
            error,
        };
        // Loaded before connecting: a credential problem is reported as such, not as a
        // failed handshake.
        let prepared = self
            .endpoint
            .tls
            .as_ref()
            .map(|t| t.prepare())
            .transpose()?;
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(connect)?;
        // The request follows the handshake's last flight at once: with Nagle it would wait
        // for that flight's (delayed) acknowledgement.
        tcp.set_nodelay(true).map_err(connect)?;
        let response = match prepared {
            None => transport::get(tcp, &authority, "/pods", None, self.max_body).await,
            Some(p) => {
                let tls = tokio_rustls::TlsConnector::from(p.config)
                    .connect(p.server_name, tcp)
                    .await
                    .map_err(|error| LookupError::Tls {
                        url: url.to_string(),
                        error,
                    })?;
                let bearer = p.bearer.as_ref().map(|t| t.as_str());
                transport::get(tls, &authority, "/pods", bearer, self.max_body).await
            }
        };
        let malformed = |reason: String| LookupError::Malformed {
            url: url.to_string(),
            reason,
        };
        let response = response.map_err(|e| match e {
            transport::HttpError::Io(error) => connect(error),
            transport::HttpError::Malformed(reason) => malformed(reason.to_owned()),
        })?;
        match response.status() {
            Some(200) => {}
            status => {
                let hint = match status {
                    Some(401) => " (it did not accept the daemon's token or client certificate)",
                    Some(403) => {
                        " (the daemon's identity may not get nodes/proxy or nodes/pods on this node)"
                    }
                    _ => "",
                };
                return Err(LookupError::Status {
                    url: url.to_string(),
                    status: response.status_line,
                    hint,
                });
            }
        }
        let pods = parse_pod_list(&response.body).map_err(|e| malformed(e.to_string()))?;
        Ok((pods, response.body.len()))
    }
}

/// The facts of every pod in a kubelet `/pods` body (a `PodList`), by pod UID; pods without
/// a UID are left out.
fn parse_pod_list(body: &[u8]) -> Result<HashMap<String, PodFacts>, serde_json::Error> {
    let list: PodList = serde_json::from_slice(body)?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| !p.metadata.uid.is_empty())
        .map(|p| {
            let users = p.spec.users();
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
                users,
            };
            (p.metadata.uid, facts)
        })
        .collect())
}

/// Entry points for the fuzz targets in the repository's `fuzz/` crate (feature `fuzzing`).
/// Not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use std::collections::HashMap;

    use tokio::io::{AsyncRead, AsyncWrite};

    use super::PodFacts;

    /// The pod-list JSON as [`super::KubeletPods`] reads it.
    pub fn pod_list(body: &[u8]) -> Result<HashMap<String, PodFacts>, String> {
        super::parse_pod_list(body).map_err(|e| e.to_string())
    }

    /// The HTTP exchange of one pod-list fetch over `stream`: the status code (if the status
    /// line has one) and the body of at most `limit` bytes.
    pub async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
        stream: S,
        limit: usize,
    ) -> Result<(Option<u16>, Vec<u8>), String> {
        super::transport::get(stream, "127.0.0.1:10250", "/pods", Some("token"), limit)
            .await
            .map(|r| (r.status(), r.body))
            .map_err(|e| e.to_string())
    }

    /// The chunked-body decoder of the HTTP client.
    pub fn dechunk(body: &[u8], limit: usize) -> Option<Vec<u8>> {
        super::transport::dechunk(body, limit)
    }
}

#[cfg(test)]
mod tests;
