//! [`DelegatedIdentityApi`]: the production [`IdentitySource`], a gRPC client of the SPIRE
//! agent's Delegated Identity API over its admin unix socket.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Endpoint, Uri};
use zeroize::Zeroizing;

use super::proto::api::agent::delegatedidentity::v1::{
    FetchJwtsviDsRequest, FetchJwtsviDsResponse, SubscribeToJwtBundlesRequest,
    SubscribeToJwtBundlesResponse, SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse,
    SubscribeToX509sviDsRequest, SubscribeToX509sviDsResponse,
    delegated_identity_client::DelegatedIdentityClient,
};
use super::proto::api::types;
use crate::spiffe::{SpiffeId, TrustDomain};

use super::{
    BundleSet, BundleStream, DecodeError, IdentitySource, JwtBundleSet, JwtBundleStream, JwtSvid,
    SourceError, SvidStream, SvidUpdate, Workload, X509Svid, split_der_certificates,
};

/// Tuning of [`DelegatedIdentityApi`].
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Bound on dialling the socket and setting up HTTP/2. A local socket answers at once or
    /// not at all, so this only needs to cover a loaded node.
    pub connect_timeout: Duration,
    /// Largest message accepted from the agent. gRPC's (and tonic's) 4 MiB default is too small
    /// for workloads with many identities: every message carries the complete set, each SVID
    /// with its chain and key.
    pub max_decoding_message_size: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            max_decoding_message_size: 16 << 20,
        }
    }
}

/// Talks to SPIRE agents over their admin sockets.
///
/// One HTTP/2 connection per agent path is cached and shared by every subscription to that
/// agent (the agent authenticates the connecting process once per connection and again per
/// call, so fewer connections mean less work for it). A connection that failed is dropped from
/// the cache and redialled on the next call.
#[derive(Default)]
pub struct DelegatedIdentityApi {
    config: ApiConfig,
    channels: Mutex<HashMap<PathBuf, Channel>>,
}

impl DelegatedIdentityApi {
    pub fn new(config: ApiConfig) -> Self {
        Self {
            config,
            channels: Mutex::default(),
        }
    }

    async fn client(&self, agent: &Path) -> Result<DelegatedIdentityClient<Channel>, SourceError> {
        let channel = match self.cached(agent) {
            Some(channel) => channel,
            None => {
                let channel = connect(agent, self.config.connect_timeout).await?;
                // Two concurrent first calls may both dial; the later insert wins and the
                // other connection closes when its calls end. Harmless and rare.
                self.lock().insert(agent.to_owned(), channel.clone());
                channel
            }
        };
        Ok(DelegatedIdentityClient::new(channel)
            .max_decoding_message_size(self.config.max_decoding_message_size))
    }

    fn cached(&self, agent: &Path) -> Option<Channel> {
        self.lock().get(agent).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Channel>> {
        // The map stays consistent even if a holder panicked: every operation is one call.
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Maps the failure of a call (not of a stream item). A status carrying a source error
    /// was made up by tonic from a transport failure, not sent by the agent: report it as a
    /// connection problem and forget the connection.
    fn call_failed(&self, agent: &Path, status: tonic::Status) -> SourceError {
        if std::error::Error::source(&status).is_some() {
            self.lock().remove(agent);
            return SourceError::Connect {
                path: agent.to_owned(),
                error: Box::new(status),
            };
        }
        status.into()
    }
}

impl IdentitySource for DelegatedIdentityApi {
    async fn subscribe_svids(
        &self,
        agent: &Path,
        workload: &Workload,
    ) -> Result<SvidStream, SourceError> {
        let request = svid_request(workload)?;
        let mut client = self.client(agent).await?;
        let stream = client
            .subscribe_to_x509svi_ds(request)
            .await
            .map_err(|status| self.call_failed(agent, status))?
            .into_inner();
        Ok(Box::pin(Updates::new(stream, svid_update)))
    }

    async fn subscribe_bundles(&self, agent: &Path) -> Result<BundleStream, SourceError> {
        let mut client = self.client(agent).await?;
        let stream = client
            .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {})
            .await
            .map_err(|status| self.call_failed(agent, status))?
            .into_inner();
        Ok(Box::pin(Updates::new(stream, bundle_set)))
    }

    async fn fetch_jwt_svids(
        &self,
        agent: &Path,
        workload: &Workload,
        audience: &[String],
    ) -> Result<Vec<JwtSvid>, SourceError> {
        let request = jwt_request(workload, audience)?;
        let mut client = self.client(agent).await?;
        let response = client
            .fetch_jwtsvi_ds(request)
            .await
            .map_err(|status| self.call_failed(agent, status))?
            .into_inner();
        Ok(jwt_svids(response))
    }

    async fn subscribe_jwt_bundles(&self, agent: &Path) -> Result<JwtBundleStream, SourceError> {
        let mut client = self.client(agent).await?;
        let stream = client
            .subscribe_to_jwt_bundles(SubscribeToJwtBundlesRequest {})
            .await
            .map_err(|status| self.call_failed(agent, status))?
            .into_inner();
        Ok(Box::pin(Updates::new(stream, jwt_bundle_set)))
    }

    async fn probe(&self, agent: &Path) -> Result<(), SourceError> {
        // The cheapest call that the agent authorizes like every other: it attests the
        // daemon, checks it against its entries and authorized_delegates, and answers with
        // its bundles at once. Dropping the stream cancels the call.
        let timeout = self.config.connect_timeout;
        let first = async {
            let mut stream = self.subscribe_bundles(agent).await?;
            match stream.next().await {
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) => Err(e),
                None => Err(SourceError::StreamEnded),
            }
        };
        match tokio::time::timeout(timeout, first).await {
            Ok(result) => result,
            Err(_) => Err(connect_error(agent, timeout_error(timeout))),
        }
    }
}

pub(super) async fn connect(agent: &Path, timeout: Duration) -> Result<Channel, SourceError> {
    let path: Arc<Path> = agent.into();
    let connector = tower::service_fn(move |_: Uri| {
        let path = Arc::clone(&path);
        async move { UnixStream::connect(&*path).await.map(TokioIo::new) }
    });
    // The URI only fills the :authority header; the connector ignores it.
    let endpoint = Endpoint::from_static("http://localhost").connect_timeout(timeout);
    // tonic's connect timeout covers only the connector; bound the HTTP/2 setup as well.
    match tokio::time::timeout(timeout, endpoint.connect_with_connector(connector)).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(connect_error(agent, e)),
        Err(_) => Err(connect_error(agent, timeout_error(timeout))),
    }
}

pub(super) fn connect_error(
    agent: &Path,
    error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> SourceError {
    SourceError::Connect {
        path: agent.to_owned(),
        error: error.into(),
    }
}

pub(super) fn timeout_error(timeout: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within {timeout:?}"),
    )
}

fn svid_request(workload: &Workload) -> Result<SubscribeToX509sviDsRequest, SourceError> {
    // Refused here rather than by the agent: 0 means "no PID" on the wire, a negative PID is
    // never valid, and an empty selector set would be read as "neither given".
    match workload {
        Workload::Pid(pid) if *pid <= 0 => {
            Err(SourceError::InvalidWorkload("PID must be positive"))
        }
        Workload::Pid(pid) => Ok(SubscribeToX509sviDsRequest {
            selectors: Vec::new(),
            pid: *pid,
        }),
        Workload::Selectors(selectors) if selectors.is_empty() => {
            Err(SourceError::InvalidWorkload("selector set is empty"))
        }
        Workload::Selectors(selectors) => Ok(SubscribeToX509sviDsRequest {
            selectors: selectors
                .iter()
                .map(|s| types::Selector {
                    r#type: s.kind.clone(),
                    value: s.value.clone(),
                })
                .collect(),
            pid: 0,
        }),
    }
}

fn jwt_request(
    workload: &Workload,
    audience: &[String],
) -> Result<FetchJwtsviDsRequest, SourceError> {
    if audience.is_empty() {
        return Err(SourceError::InvalidWorkload("JWT audience is empty"));
    }
    let by = svid_request(workload)?;
    Ok(FetchJwtsviDsRequest {
        audience: audience.to_vec(),
        selectors: by.selectors,
        pid: by.pid,
    })
}

/// Converts a JWT-SVID answer, dropping tokens that cannot be used (the agent never sends
/// them) like [`svid_update`] does.
fn jwt_svids(response: FetchJwtsviDsResponse) -> Vec<JwtSvid> {
    super::jwt::usable("SPIRE agent", response.svids, |svid| {
        let token = Zeroizing::new(svid.token);
        let id = svid.id.ok_or((None, "without a SPIFFE ID".to_owned()))?;
        let spiffe_id = SpiffeId::from_parts(&id.trust_domain, &id.path).map_err(|error| {
            let shown = format!("{}{}", id.trust_domain, id.path);
            (
                None,
                format!("with an invalid SPIFFE ID ({shown:?}: {error})"),
            )
        })?;
        Ok(super::jwt::Sent {
            spiffe_id,
            token,
            issued_at: svid.issued_at,
            expires_at: svid.expires_at,
            hint: svid.hint,
        })
    })
}

fn jwt_bundle_set(response: SubscribeToJwtBundlesResponse) -> Result<JwtBundleSet, SourceError> {
    super::jwt::bundle_set(response.bundles)
}

/// Converts one SVID message. Unusable SVIDs are dropped rather than failing the message: the
/// others in the set are still good, and the agent itself never sends such entries.
fn svid_update(response: SubscribeToX509sviDsResponse) -> Result<SvidUpdate, SourceError> {
    let mut svids = Vec::with_capacity(response.x509_svids.len());
    for with_key in response.x509_svids {
        // Wrapped first so that the key is wiped even when the SVID is dropped below.
        let private_key = Zeroizing::new(with_key.x509_svid_key);
        let Some(svid) = with_key.x509_svid else {
            tracing::warn!("SPIRE agent sent an SVID entry without an SVID; ignored");
            continue;
        };
        let Some(id) = svid.id else {
            tracing::warn!("SPIRE agent sent an SVID without a SPIFFE ID; ignored");
            continue;
        };
        let spiffe_id = match SpiffeId::from_parts(&id.trust_domain, &id.path) {
            Ok(id) => id,
            Err(error) => {
                tracing::warn!(trust_domain = %id.trust_domain, path = %id.path, %error,
                    "SPIRE agent sent an SVID with an invalid SPIFFE ID; ignored");
                continue;
            }
        };
        if svid.cert_chain.is_empty() || svid.cert_chain.iter().any(Vec::is_empty) {
            tracing::warn!(%spiffe_id, "SPIRE agent sent an SVID with an empty certificate chain; ignored");
            continue;
        }
        if private_key.is_empty() {
            tracing::warn!(%spiffe_id, "SPIRE agent sent an SVID without a private key; ignored");
            continue;
        }
        svids.push(X509Svid {
            spiffe_id,
            cert_chain: svid.cert_chain,
            private_key,
            expires_at: svid.expires_at,
            hint: svid.hint,
        });
    }
    Ok(SvidUpdate {
        svids,
        federates_with: response
            .federates_with
            .iter()
            .filter_map(|td| trust_domain(td, "a federated trust domain"))
            .collect(),
    })
}

fn bundle_set(response: SubscribeToX509BundlesResponse) -> Result<BundleSet, SourceError> {
    let mut bundles = std::collections::BTreeMap::new();
    for (key, der) in response.ca_certificates {
        let Some(trust_domain) = trust_domain(&key, "a bundle") else {
            continue;
        };
        let certs = split_der_certificates(&der).map_err(|error| DecodeError::Bundle {
            trust_domain: key,
            error,
        })?;
        bundles.insert(trust_domain, certs);
    }
    Ok(BundleSet { bundles })
}

/// The agent keys bundles and lists federated domains as `spiffe://<td>`, although the proto
/// comments speak of trust domain names; both are accepted. A name that is neither is dropped
/// (SPIRE never sends one): the other trust domains stay usable.
pub(super) fn trust_domain(key: &str, what: &str) -> Option<TrustDomain> {
    match TrustDomain::parse(key) {
        Ok(td) => Some(td),
        Err(error) => {
            tracing::warn!(trust_domain = %key, %error, "SPIRE agent named {what} by an invalid trust domain; ignored");
            None
        }
    }
}

/// Entry points for the fuzz targets in the repository's `fuzz/` crate (feature `fuzzing`):
/// an agent message as the client decodes and converts it. Not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use prost::Message as _;

    use super::{
        BundleSet, SourceError, SubscribeToX509BundlesResponse, SubscribeToX509sviDsResponse,
        SvidUpdate,
    };

    /// One `SubscribeToX509SVIDs` message: protobuf, then validation.
    pub fn svid_message(bytes: &[u8]) -> Result<SvidUpdate, String> {
        let response = SubscribeToX509sviDsResponse::decode(bytes).map_err(|e| e.to_string())?;
        super::svid_update(response).map_err(|e: SourceError| e.to_string())
    }

    /// One `FetchJWTSVIDs` answer: protobuf, then validation.
    pub fn jwt_message(bytes: &[u8]) -> Result<Vec<super::JwtSvid>, String> {
        let response = super::FetchJwtsviDsResponse::decode(bytes).map_err(|e| e.to_string())?;
        Ok(super::jwt_svids(response))
    }

    /// One `SubscribeToJWTBundles` message: protobuf, then the JWKS check of each bundle.
    pub fn jwt_bundle_message(bytes: &[u8]) -> Result<super::JwtBundleSet, String> {
        let response =
            super::SubscribeToJwtBundlesResponse::decode(bytes).map_err(|e| e.to_string())?;
        super::jwt_bundle_set(response).map_err(|e| e.to_string())
    }

    /// One `SubscribeToX509Bundles` message: protobuf, then the DER split of each bundle.
    pub fn bundle_message(bytes: &[u8]) -> Result<BundleSet, String> {
        let response = SubscribeToX509BundlesResponse::decode(bytes).map_err(|e| e.to_string())?;
        super::bundle_set(response).map_err(|e| e.to_string())
    }
}

/// Adapts a tonic stream to the seam's contract: converted items, every error final, and an
/// explicit [`SourceError::StreamEnded`] when the agent ends the stream cleanly.
pub(super) struct Updates<T, U> {
    /// `None` once an error was returned; dropping the tonic stream cancels the call.
    inner: Option<tonic::Streaming<T>>,
    convert: fn(T) -> Result<U, SourceError>,
}

impl<T, U> Updates<T, U> {
    pub(super) fn new(
        inner: tonic::Streaming<T>,
        convert: fn(T) -> Result<U, SourceError>,
    ) -> Self {
        Self {
            inner: Some(inner),
            convert,
        }
    }
}

impl<T, U> Stream for Updates<T, U> {
    type Item = Result<U, SourceError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let error = match ready!(Pin::new(inner).poll_next(cx)) {
            Some(Ok(message)) => match (this.convert)(message) {
                Ok(update) => return Poll::Ready(Some(Ok(update))),
                Err(e) => e,
            },
            // A status with a source was made up by tonic from a transport failure; one
            // from the agent has none.
            Some(Err(status)) if std::error::Error::source(&status).is_some() => {
                SourceError::Disconnected(Box::new(status))
            }
            Some(Err(status)) => status.into(),
            None => SourceError::StreamEnded,
        };
        this.inner = None;
        Poll::Ready(Some(Err(error)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spire::proto::api::agent::delegatedidentity::v1::X509svidWithKey;
    use crate::spire::{MAX_JWT_BYTES, Selector};

    fn wire_svid(td: &str, path: &str, chain: Vec<Vec<u8>>, key: &[u8]) -> X509svidWithKey {
        X509svidWithKey {
            x509_svid: Some(types::X509svid {
                cert_chain: chain,
                id: Some(types::Spiffeid {
                    trust_domain: td.into(),
                    path: path.into(),
                }),
                expires_at: 1_700_000_000,
                hint: "h".into(),
            }),
            x509_svid_key: key.to_vec(),
        }
    }

    #[test]
    fn requests_refuse_what_the_wire_cannot_express() {
        for bad in [
            Workload::Pid(0),
            Workload::Pid(-3),
            Workload::Selectors(vec![]),
        ] {
            let err = svid_request(&bad).unwrap_err();
            assert_eq!(err.kind(), "invalid_workload");
            assert!(!err.is_retryable());
        }
        let by_pid = svid_request(&Workload::Pid(7)).unwrap();
        assert_eq!((by_pid.pid, by_pid.selectors.len()), (7, 0));
        let by_sel =
            svid_request(&Workload::Selectors(vec![Selector::new("unix", "uid:0")])).unwrap();
        assert_eq!(by_sel.pid, 0);
        assert_eq!(by_sel.selectors[0].r#type, "unix");
        assert_eq!(by_sel.selectors[0].value, "uid:0");
    }

    #[test]
    fn svid_messages_are_validated_and_ids_formed() {
        let response = SubscribeToX509sviDsResponse {
            x509_svids: vec![
                wire_svid("example.org", "/web", vec![vec![0x30, 0]], b"key"),
                wire_svid("example.org", "/nochain", vec![], b"key"),
                wire_svid("example.org", "/emptycert", vec![vec![]], b"key"),
                wire_svid("example.org", "/nokey", vec![vec![0x30, 0]], b""),
                wire_svid("", "/notd", vec![vec![0x30, 0]], b"key"),
                X509svidWithKey {
                    x509_svid: None,
                    x509_svid_key: b"key".to_vec(),
                },
                wire_svid("example.org", "bare", vec![vec![0x30, 0]], b"key"),
                wire_svid("Example.org", "/upper", vec![vec![0x30, 0]], b"key"),
                wire_svid("example.org", "/a/../b", vec![vec![0x30, 0]], b"key"),
            ],
            federates_with: vec![
                "spiffe://other.org".into(),
                "bare.org".into(),
                "spiffe://Bad.Org".into(),
            ],
        };
        let update = svid_update(response).unwrap();
        let ids: Vec<_> = update.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
        assert_eq!(
            ids,
            ["spiffe://example.org/web", "spiffe://example.org/bare"]
        );
        assert_eq!(update.svids[0].hint, "h");
        assert_eq!(update.svids[0].expires_at, 1_700_000_000);
        assert_eq!(&update.svids[0].private_key[..], b"key");
        let federated: Vec<_> = update
            .federates_with
            .iter()
            .map(TrustDomain::name)
            .collect();
        assert_eq!(federated, ["other.org", "bare.org"]);
        assert!(!format!("{:?}", update.svids[0]).contains("107, 101, 121"));
    }

    fn wire_jwt(path: &str, token: &str, iat: i64, exp: i64) -> types::Jwtsvid {
        types::Jwtsvid {
            token: token.into(),
            id: Some(types::Spiffeid {
                trust_domain: "example.org".into(),
                path: path.into(),
            }),
            expires_at: exp,
            issued_at: iat,
            hint: String::new(),
        }
    }

    #[test]
    fn jwt_requests_need_an_audience_and_a_valid_workload() {
        let err = jwt_request(&Workload::Pid(7), &[]).unwrap_err();
        assert_eq!(err.kind(), "invalid_workload");
        let err = jwt_request(&Workload::Pid(0), &["a".into()]).unwrap_err();
        assert_eq!(err.kind(), "invalid_workload");
        let request = jwt_request(&Workload::Pid(7), &["a".into(), "b".into()]).unwrap();
        assert_eq!((request.pid, request.audience.len()), (7, 2));
    }

    #[test]
    fn jwt_svids_that_are_not_compact_jws_are_dropped() {
        let response = FetchJwtsviDsResponse {
            svids: vec![
                wire_jwt("/web", "aGVh.cGF5.c2ln", 100, 200),
                wire_jwt("/nl", "aGVh.cGF5\n.c2ln", 100, 200),
                wire_jwt("/two", "aGVh.cGF5", 100, 200),
                wire_jwt("/empty", "aGVh..c2ln", 100, 200),
                wire_jwt("/padded", "aGVh.cGF5=.c2ln", 100, 200),
                wire_jwt("/backwards", "aGVh.cGF5.c2ln", 200, 100),
                wire_jwt(
                    "/huge",
                    &format!("a.{}.c", "b".repeat(MAX_JWT_BYTES)),
                    100,
                    200,
                ),
            ],
        };
        let svids = jwt_svids(response);
        let ids: Vec<_> = svids.iter().map(|s| s.spiffe_id.as_str()).collect();
        assert_eq!(ids, ["spiffe://example.org/web"]);
        assert_eq!((svids[0].issued_at, svids[0].expires_at), (100, 200));
        assert!(!format!("{:?}", svids[0]).contains("aGVh"));
    }

    #[test]
    fn jwt_bundles_must_be_jwks_documents() {
        let mut bundles = std::collections::BTreeMap::new();
        bundles.insert(
            "spiffe://example.org".to_owned(),
            br#"{"keys":[]}"#.to_vec(),
        );
        bundles.insert("spiffe://../x".to_owned(), b"{}".to_vec());
        let set = jwt_bundle_set(SubscribeToJwtBundlesResponse { bundles }).unwrap();
        let names: Vec<_> = set.bundles.keys().map(TrustDomain::name).collect();
        assert_eq!(names, ["example.org"]);
        for bad in [&b"nope"[..], b"[]", br#"{"keys":{}}"#] {
            let mut bundles = std::collections::BTreeMap::new();
            bundles.insert("spiffe://example.org".to_owned(), bad.to_vec());
            let err = jwt_bundle_set(SubscribeToJwtBundlesResponse { bundles }).unwrap_err();
            assert_eq!(err.kind(), "decode");
            assert!(
                err.to_string()
                    .contains("jwt bundle of spiffe://example.org"),
                "{err}"
            );
        }
    }

    #[test]
    fn malformed_bundles_are_decode_errors() {
        let mut ca_certificates = std::collections::BTreeMap::new();
        ca_certificates.insert("spiffe://example.org".to_owned(), vec![0x30, 0x05, 1]);
        let err = bundle_set(SubscribeToX509BundlesResponse { ca_certificates }).unwrap_err();
        assert_eq!(err.kind(), "decode");
        assert!(err.to_string().contains("spiffe://example.org"), "{err}");
    }

    #[test]
    fn bundles_are_keyed_by_trust_domain_and_invalid_names_dropped() {
        let mut ca_certificates = std::collections::BTreeMap::new();
        ca_certificates.insert("spiffe://example.org".to_owned(), vec![0x30, 0]);
        ca_certificates.insert("other.org".to_owned(), vec![0x30, 0]);
        ca_certificates.insert("spiffe://../etc".to_owned(), vec![0x30, 0]);
        let set = bundle_set(SubscribeToX509BundlesResponse { ca_certificates }).unwrap();
        let names: Vec<_> = set.bundles.keys().map(TrustDomain::name).collect();
        assert_eq!(names, ["example.org", "other.org"]);
    }
}
