//! [`BrokerApi`]: an [`IdentitySource`] that asks the SPIRE agent's SPIFFE Broker API for
//! workload identities, over mutual TLS with the daemon's own X.509 SVID.
//!
//! The Broker API names workloads by *reference* and lets the agent attest them itself: a
//! [`Workload::Pid`] becomes a `WorkloadPIDReference` (attested like a Workload API caller,
//! down to the container), and [`Workload::Selectors`] becomes a `KubernetesObjectReference` of
//! the pod named by the set's `k8s:ns`, `k8s:pod-name` and `k8s:pod-uid` selectors (attested
//! from the pod, so pod-level selectors only). The other selectors are not sent: the agent
//! derives its own.
//!
//! Authentication: every connection presents an X.509 SVID that the agent's Workload API issues
//! the daemon, fetched anew whenever a connection is dialled (the first call, and every
//! reconnection after a failure), so a rotated SVID is used from the next connection on; an
//! established connection keeps the certificate it was opened with, as TLS does. The agent's
//! certificate must chain to the bundle of the daemon's trust domain that came with that SVID
//! and name a SPIFFE ID of that trust domain.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prost::Message as _;
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use zeroize::Zeroizing;

use super::client::{Updates, connect_error, timeout_error, trust_domain};
use super::spiffe_proto::broker::{
    FetchJwtsvidRequest, FetchJwtsvidResponse, KubernetesObjectKey, KubernetesObjectReference,
    KubernetesObjectType, SubscribeToJwtBundlesRequest, SubscribeToJwtBundlesResponse,
    SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse, SubscribeToX509svidRequest,
    SubscribeToX509svidResponse, WorkloadPidReference, WorkloadReference, api_client::ApiClient,
};
use super::spiffe_proto::workload::{
    X509svidRequest, spiffe_workload_api_client::SpiffeWorkloadApiClient,
};
use super::{
    BundleSet, BundleStream, DecodeError, DelegateRefusal, IdentitySource, JwtBundleSet,
    JwtBundleStream, JwtSvid, SourceError, SvidStream, SvidUpdate, Workload, X509Svid,
    split_der_certificates,
};
use crate::der::x509;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::tls::{PROVIDER, ServerCertCheck, Verifier};

/// Type URL of a `WorkloadPIDReference`, as the agent's `allowed_reference_types` name it.
pub const PID_REFERENCE_TYPE: &str = "type.googleapis.com/spiffe.broker.WorkloadPIDReference";
/// Type URL of a `KubernetesObjectReference`.
pub const OBJECT_REFERENCE_TYPE: &str =
    "type.googleapis.com/spiffe.broker.KubernetesObjectReference";

/// Tuning and identity of [`BrokerApi`].
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// The agent's Workload API socket, where the daemon gets its own X.509 SVID.
    pub workload_api: PathBuf,
    /// Which of the daemon's SVIDs to present; `None`: the first the Workload API lists.
    pub spiffe_id: Option<SpiffeId>,
    /// Bound on fetching the daemon's SVID, dialling and the TLS and HTTP/2 handshakes.
    pub connect_timeout: Duration,
    /// Largest message accepted from the agent (see [`super::ApiConfig`]).
    pub max_decoding_message_size: usize,
}

impl BrokerConfig {
    pub fn new(workload_api: impl Into<PathBuf>) -> Self {
        Self {
            workload_api: workload_api.into(),
            spiffe_id: None,
            connect_timeout: Duration::from_secs(3),
            max_decoding_message_size: 16 << 20,
        }
    }
}

/// Talks to SPIRE agents' broker endpoints. `agent` in [`IdentitySource`] is the path of the
/// broker endpoint's unix socket. One connection per endpoint is cached and shared, and
/// dropped after a transport failure, like [`super::DelegatedIdentityApi`] does.
pub struct BrokerApi {
    config: Arc<BrokerConfig>,
    channels: Mutex<HashMap<PathBuf, Channel>>,
}

type Client = ApiClient<InterceptedService<Channel, fn(tonic::Request<()>) -> TonicResult>>;
type TonicResult = Result<tonic::Request<()>, tonic::Status>;

/// The Broker Endpoint standard requires this metadata on every request (an SSRF guard);
/// SPIRE answers `InvalidArgument` without it.
fn security_header(mut request: tonic::Request<()>) -> TonicResult {
    request.metadata_mut().insert(
        "broker.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(request)
}

impl BrokerApi {
    pub fn new(config: BrokerConfig) -> Self {
        Self {
            config: Arc::new(config),
            channels: Mutex::default(),
        }
    }

    async fn client(&self, broker: &Path) -> Result<Client, SourceError> {
        let cached = self.lock().get(broker).cloned();
        let channel = match cached {
            Some(channel) => channel,
            None => {
                let channel = self.connect(broker).await?;
                self.lock().insert(broker.to_owned(), channel.clone());
                channel
            }
        };
        let interceptor: fn(tonic::Request<()>) -> TonicResult = security_header;
        Ok(ApiClient::with_interceptor(channel, interceptor)
            .max_decoding_message_size(self.config.max_decoding_message_size))
    }

    async fn connect(&self, broker: &Path) -> Result<Channel, SourceError> {
        let path: Arc<Path> = broker.into();
        let config = Arc::clone(&self.config);
        // Every dial (tonic redials on its own after a broken connection) fetches the
        // daemon's current SVID, so a rotated certificate is picked up by new connections.
        let connector = tower::service_fn(move |_: Uri| {
            let path = Arc::clone(&path);
            let config = Arc::clone(&config);
            async move { dial(&config, &path).await }
        });
        let timeout = self.config.connect_timeout;
        let endpoint = Endpoint::from_static("http://localhost").connect_timeout(timeout);
        match tokio::time::timeout(timeout, endpoint.connect_with_connector(connector)).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) => Err(self
                .failed(broker, &e)
                .unwrap_or_else(|| connect_error(broker, e))),
            Err(_) => Err(connect_error(broker, timeout_error(timeout))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Channel>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A refusal of the daemon itself found in a transport failure (no SVID of its own, or
    /// its certificate rejected in the handshake); the connection is forgotten.
    fn failed(
        &self,
        broker: &Path,
        error: &(dyn std::error::Error + 'static),
    ) -> Option<SourceError> {
        let (refusal, message) = refusal_in_chain(error)?;
        self.lock().remove(broker);
        Some(SourceError::Refused { refusal, message })
    }

    /// Maps the failure of a call, as [`super::DelegatedIdentityApi`] does, plus the Broker
    /// API's own refusals.
    fn call_failed(&self, broker: &Path, status: tonic::Status) -> SourceError {
        if let Some(error) = self.failed(broker, &status) {
            return error;
        }
        if std::error::Error::source(&status).is_some() {
            self.lock().remove(broker);
            return SourceError::Connect {
                path: broker.to_owned(),
                error: Box::new(status),
            };
        }
        status_error(status)
    }
}

impl IdentitySource for BrokerApi {
    async fn subscribe_svids(
        &self,
        agent: &Path,
        workload: &Workload,
    ) -> Result<SvidStream, SourceError> {
        let reference = reference(workload)?;
        let mut client = self.client(agent).await?;
        let stream = client
            .subscribe_to_x509svid(SubscribeToX509svidRequest {
                reference: Some(reference),
            })
            .await
            .map_err(|status| self.call_failed(agent, status))?
            .into_inner();
        Ok(Box::pin(
            Updates::new(stream, svid_update).map(|item| item.map_err(stream_error)),
        ))
    }

    /// The Broker API asks for a workload even for bundles; the answer is the agent's whole
    /// set whatever the workload, so the daemon names itself by its PID.
    async fn subscribe_bundles(&self, agent: &Path) -> Result<BundleStream, SourceError> {
        let own = Workload::Pid(std::process::id() as i32);
        let mut client = self.client(agent).await?;
        let stream = client
            .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {
                reference: Some(reference(&own)?),
            })
            .await
            .map_err(|status| self.call_failed(agent, status))?
            .into_inner();
        Ok(Box::pin(
            Updates::new(stream, bundle_set).map(|item| item.map_err(stream_error)),
        ))
    }

    async fn fetch_jwt_svids(
        &self,
        agent: &Path,
        workload: &Workload,
        audience: &[String],
    ) -> Result<Vec<JwtSvid>, SourceError> {
        if audience.is_empty() {
            return Err(SourceError::InvalidWorkload("JWT audience is empty"));
        }
        let reference = reference(workload)?;
        let mut client = self.client(agent).await?;
        let response = client
            .fetch_jwtsvid(FetchJwtsvidRequest {
                reference: Some(reference),
                audience: audience.to_vec(),
                spiffe_id: String::new(),
            })
            .await
            .map_err(|status| self.call_failed(agent, status))?
            .into_inner();
        Ok(jwt_svids(response, super::unix_now()))
    }

    /// Like [`Self::subscribe_bundles`]: the daemon names itself, the answer is every JWKS.
    async fn subscribe_jwt_bundles(&self, agent: &Path) -> Result<JwtBundleStream, SourceError> {
        let own = Workload::Pid(std::process::id() as i32);
        let mut client = self.client(agent).await?;
        let stream = client
            .subscribe_to_jwt_bundles(SubscribeToJwtBundlesRequest {
                reference: Some(reference(&own)?),
            })
            .await
            .map_err(|status| self.call_failed(agent, status))?
            .into_inner();
        Ok(Box::pin(
            Updates::new(stream, jwt_bundle_set).map(|item| item.map_err(stream_error)),
        ))
    }

    /// The bundle stream's first message: it proves the daemon's SVID, the agent's broker
    /// allowlist and the PID reference type in one call.
    async fn probe(&self, agent: &Path) -> Result<(), SourceError> {
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

/// Refusals the agent words as statuses on an open stream are classified like at the call.
fn stream_error(error: SourceError) -> SourceError {
    match error {
        SourceError::Status { code, message } => status_error(tonic::Status::new(code, message)),
        other => other,
    }
}

/// SPIRE's broker endpoint words its refusals of the broker itself this way (v1.15).
fn status_error(status: tonic::Status) -> SourceError {
    let message = status.message().to_owned();
    let refusal = match status.code() {
        tonic::Code::PermissionDenied
            if message.contains("is not allowed to use reference type") =>
        {
            Some(DelegateRefusal::ReferenceTypeNotAllowed)
        }
        tonic::Code::PermissionDenied if message.contains("is not allowed over TCP") => {
            Some(DelegateRefusal::ReferenceTypeNotAllowed)
        }
        tonic::Code::PermissionDenied
            if message.starts_with("broker ") && message.contains("is not configured") =>
        {
            Some(DelegateRefusal::BrokerNotInAttestor)
        }
        tonic::Code::Internal if message.contains("broker configuration missing") => {
            Some(DelegateRefusal::BrokerNotInAttestor)
        }
        _ => None,
    };
    match refusal {
        Some(refusal) => SourceError::Refused { refusal, message },
        None => SourceError::Status {
            code: status.code(),
            message,
        },
    }
}

/// Finds, in a transport error's chain, why the agent will not talk to the daemon at all.
fn refusal_in_chain(
    error: &(dyn std::error::Error + 'static),
) -> Option<(DelegateRefusal, String)> {
    let mut next = Some(error);
    while let Some(e) = next {
        match e.downcast_ref::<DialError>() {
            Some(DialError::NoSvid(message)) => {
                return Some((DelegateRefusal::NoBrokerSvid, message.clone()));
            }
            Some(DialError::Rejected(message)) => {
                return Some((DelegateRefusal::BrokerNotListed, message.clone()));
            }
            _ => {}
        }
        let rustls_error = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(alert)) = rustls_error
            && is_client_certificate_alert(*alert)
        {
            return Some((
                DelegateRefusal::BrokerNotListed,
                format!("TLS alert {alert:?} from the broker endpoint"),
            ));
        }
        // HTTP/2 keeps only the text of an I/O error that ends a connection it had already
        // set up (TLS 1.3 servers judge the client's certificate after the client's side of
        // the handshake is done, so the alert comes with the first read).
        let text = e.to_string();
        if let Some(alert) = text.split_once("received fatal alert: ").map(|(_, rest)| {
            rest.split(|c: char| !c.is_ascii_alphanumeric())
                .next()
                .unwrap_or("")
        }) && CLIENT_CERTIFICATE_ALERTS.contains(&alert)
        {
            return Some((
                DelegateRefusal::BrokerNotListed,
                format!("TLS alert {alert} from the broker endpoint"),
            ));
        }
        next = e.source();
    }
    None
}

/// [`is_client_certificate_alert`]'s alerts as rustls prints them.
const CLIENT_CERTIFICATE_ALERTS: &[&str] = &[
    "BadCertificate",
    "CertificateRequired",
    "UnknownCA",
    "AccessDenied",
    "UnsupportedCertificate",
    "CertificateUnknown",
];

/// The alerts a TLS server sends when it does not accept the client's certificate (Go's
/// `VerifyPeerCertificate` failure is `bad_certificate`).
fn is_client_certificate_alert(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::CertificateRequired
            | A::UnknownCA
            | A::AccessDenied
            | A::UnsupportedCertificate
            | A::CertificateUnknown
    )
}

fn reference(workload: &Workload) -> Result<WorkloadReference, SourceError> {
    let (type_url, value) = match workload {
        Workload::Pid(pid) if *pid <= 0 => {
            return Err(SourceError::InvalidWorkload("PID must be positive"));
        }
        Workload::Pid(pid) => (
            PID_REFERENCE_TYPE,
            WorkloadPidReference { pid: *pid }.encode_to_vec(),
        ),
        Workload::Selectors(selectors) => (
            OBJECT_REFERENCE_TYPE,
            pod_reference(selectors)?.encode_to_vec(),
        ),
    };
    Ok(WorkloadReference {
        reference: Some(prost_types::Any {
            type_url: type_url.to_owned(),
            value,
        }),
    })
}

/// The pod named by a selector set's `k8s:ns`, `k8s:pod-name` and `k8s:pod-uid`: by name and
/// UID when both are known (the agent then checks that they agree), else by either.
fn pod_reference(selectors: &[super::Selector]) -> Result<KubernetesObjectReference, SourceError> {
    let k8s = |prefix: &str| {
        selectors
            .iter()
            .filter(|s| s.kind == "k8s")
            .find_map(|s| s.value.strip_prefix(prefix))
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let (namespace, name, uid) = (k8s("ns:"), k8s("pod-name:"), k8s("pod-uid:"));
    let key = match (namespace, name) {
        (Some(namespace), Some(name)) => Some(KubernetesObjectKey { namespace, name }),
        _ => None,
    };
    if key.is_none() && uid.is_none() {
        return Err(SourceError::InvalidWorkload(
            "the Broker API names a pod by k8s:ns and k8s:pod-name or by k8s:pod-uid, and the selector set has neither",
        ));
    }
    Ok(KubernetesObjectReference {
        r#type: Some(KubernetesObjectType {
            plural: "pods".into(),
            group: "core".into(),
        }),
        key,
        uid: uid.unwrap_or_default(),
    })
}

/// Converts one SVID message. Unusable SVIDs are dropped, as the Delegated client does.
fn svid_update(response: SubscribeToX509svidResponse) -> Result<SvidUpdate, SourceError> {
    let mut svids = Vec::with_capacity(response.svids.len());
    for svid in response.svids {
        let private_key = Zeroizing::new(svid.x509_svid_key);
        let spiffe_id = match SpiffeId::parse(&svid.spiffe_id) {
            Ok(id) => id,
            Err(error) => {
                tracing::warn!(spiffe_id = %svid.spiffe_id, %error, "SPIRE broker endpoint sent an SVID with an invalid SPIFFE ID; ignored");
                continue;
            }
        };
        let cert_chain = match split_der_certificates(&svid.x509_svid) {
            Ok(chain) if !chain.is_empty() => chain,
            Ok(_) => {
                tracing::warn!(%spiffe_id, "SPIRE broker endpoint sent an SVID with an empty certificate chain; ignored");
                continue;
            }
            Err(error) => {
                tracing::warn!(%spiffe_id, %error, "SPIRE broker endpoint sent an SVID whose chain is not DER; ignored");
                continue;
            }
        };
        if private_key.is_empty() {
            tracing::warn!(%spiffe_id, "SPIRE broker endpoint sent an SVID without a private key; ignored");
            continue;
        }
        // The Broker API carries no expiry: read the leaf's NotAfter.
        let expires_at = match not_after(&cert_chain[0]) {
            Ok(t) => t,
            Err(error) => {
                tracing::warn!(%spiffe_id, %error, "SPIRE broker endpoint sent an SVID whose leaf does not parse; ignored");
                continue;
            }
        };
        svids.push(X509Svid {
            spiffe_id,
            cert_chain,
            private_key,
            expires_at,
            hint: svid.hint,
        });
    }
    Ok(SvidUpdate {
        svids,
        federates_with: response
            .federated_bundles
            .keys()
            .filter_map(|td| trust_domain(td, "a federated trust domain"))
            .collect(),
    })
}

fn bundle_set(response: SubscribeToX509BundlesResponse) -> Result<BundleSet, SourceError> {
    let mut bundles = BTreeMap::new();
    for (key, der) in response.bundles {
        let Some(td) = trust_domain(&key, "a bundle") else {
            continue;
        };
        let certs = split_der_certificates(&der).map_err(|error| DecodeError::Bundle {
            trust_domain: key,
            error,
        })?;
        bundles.insert(td, certs);
    }
    Ok(BundleSet { bundles })
}

/// Converts a JWT-SVID answer, dropping unusable tokens as [`svid_update`] drops SVIDs. The
/// Broker API sends no expiry: it is read from the token's own claims.
fn jwt_svids(response: FetchJwtsvidResponse, now: i64) -> Vec<JwtSvid> {
    super::jwt::usable("SPIRE broker endpoint", response.svids, |svid| {
        let token = Zeroizing::new(svid.svid);
        let spiffe_id = SpiffeId::parse(&svid.spiffe_id).map_err(|error| {
            let shown = &svid.spiffe_id;
            (
                None,
                format!("with an invalid SPIFFE ID ({shown:?}: {error})"),
            )
        })?;
        let (issued_at, expires_at) = super::jwt::claimed_times(&token, now)
            .map_err(|problem| (Some(spiffe_id.clone()), problem.to_owned()))?;
        Ok(super::jwt::Sent {
            spiffe_id,
            token,
            issued_at,
            expires_at,
            hint: svid.hint,
        })
    })
}

fn jwt_bundle_set(response: SubscribeToJwtBundlesResponse) -> Result<JwtBundleSet, SourceError> {
    super::jwt::bundle_set(response.bundles)
}

fn not_after(leaf: &[u8]) -> Result<i64, String> {
    x509::leaf(leaf)
        .map(|l| l.not_after)
        .map_err(|e| e.to_string())
}

/// The SPIFFE ID in a certificate's URI SAN.
fn uri_san(cert: &[u8]) -> Option<SpiffeId> {
    let leaf = x509::leaf(cert).ok()?;
    leaf.uris
        .iter()
        .find_map(|uri| SpiffeId::parse(std::str::from_utf8(uri).ok()?).ok())
}

/// Entry points for the fuzz targets in the repository's `fuzz/` crate (feature `fuzzing`): a
/// broker endpoint's message as this source decodes and converts it. Not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use prost::Message as _;

    use super::{
        BundleSet, FetchJwtsvidResponse, JwtBundleSet, JwtSvid, SubscribeToJwtBundlesResponse,
        SubscribeToX509BundlesResponse, SubscribeToX509svidResponse, SvidUpdate,
    };

    /// One `SubscribeToX509SVID` message: protobuf, then validation (the leaf's NotAfter read
    /// from its DER, since the Broker API carries no expiry).
    pub fn svid_message(bytes: &[u8]) -> Result<SvidUpdate, String> {
        let response = SubscribeToX509svidResponse::decode(bytes).map_err(|e| e.to_string())?;
        super::svid_update(response).map_err(|e| e.to_string())
    }

    /// One `SubscribeToX509Bundles` message: protobuf, then the DER split of each bundle.
    pub fn bundle_message(bytes: &[u8]) -> Result<BundleSet, String> {
        let response = SubscribeToX509BundlesResponse::decode(bytes).map_err(|e| e.to_string())?;
        super::bundle_set(response).map_err(|e| e.to_string())
    }

    /// One `FetchJWTSVID` answer: protobuf, then the token's times and shape, at `now`.
    pub fn jwt_message(bytes: &[u8], now: i64) -> Result<Vec<JwtSvid>, String> {
        let response = FetchJwtsvidResponse::decode(bytes).map_err(|e| e.to_string())?;
        Ok(super::jwt_svids(response, now))
    }

    /// One `SubscribeToJWTBundles` message: protobuf, then the JWKS check of each bundle.
    pub fn jwt_bundle_message(bytes: &[u8]) -> Result<JwtBundleSet, String> {
        let response = SubscribeToJwtBundlesResponse::decode(bytes).map_err(|e| e.to_string())?;
        super::jwt_bundle_set(response).map_err(|e| e.to_string())
    }
}

/// Why a connection to the broker endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
enum DialError {
    /// The Workload API answered but issues the daemon no (matching) SVID.
    #[error("{0}")]
    NoSvid(String),
    #[error("the agent's Workload API at {}: {error}", path.display())]
    WorkloadApi { path: PathBuf, error: String },
    /// The broker endpoint rejected the daemon's certificate.
    #[error("{0}")]
    Rejected(String),
    #[error("the daemon's own SVID is unusable: {0}")]
    BadSvid(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The daemon's own SVID: what it presents, and the bundle it checks the agent against.
struct OwnSvid {
    spiffe_id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: Zeroizing<Vec<u8>>,
    bundle: Vec<CertificateDer<'static>>,
}

async fn dial(
    config: &BrokerConfig,
    broker: &Path,
) -> Result<TokioIo<Primed<tokio_rustls::client::TlsStream<UnixStream>>>, DialError> {
    let own = own_svid(config).await?;
    let tls = tls_config(&own)?;
    let stream = UnixStream::connect(broker).await?;
    // The name is not checked (an SVID names no host); rustls needs one for SNI.
    let name = ServerName::try_from("spire-agent").expect("a valid DNS name");
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, stream)
        .await?;
    // With TLS 1.3 the server judges the client's certificate after the client's side of the
    // handshake is done: a rejection arrives as an alert on the first read, or as a broken
    // pipe on a write if the server has already closed. The server speaks first in HTTP/2
    // (its SETTINGS), so read that here and replay it: a rejection is then always an alert.
    let mut head = vec![0; 4096];
    let n = match tokio::time::timeout(config.connect_timeout, stream.read(&mut head)).await {
        Err(_) => return Err(DialError::Io(timeout_error(config.connect_timeout))),
        Ok(Err(e)) => {
            return Err(match refusal_in_chain(&e) {
                Some((_, message)) => DialError::Rejected(message),
                None => DialError::Io(e),
            });
        }
        Ok(Ok(0)) => {
            return Err(DialError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the broker endpoint closed the connection after the TLS handshake",
            )));
        }
        Ok(Ok(n)) => n,
    };
    head.truncate(n);
    tracing::debug!(spiffe_id = %own.spiffe_id, broker = %broker.display(), "connected to the broker endpoint");
    Ok(TokioIo::new(Primed {
        head,
        pos: 0,
        inner: stream,
    }))
}

/// A stream whose first bytes were already read: they are returned again before the rest.
struct Primed<S> {
    head: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Primed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.pos);
            buf.put_slice(&this.head[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Primed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

async fn own_svid(config: &BrokerConfig) -> Result<OwnSvid, DialError> {
    let path = &config.workload_api;
    let api_error = |error: String| DialError::WorkloadApi {
        path: path.clone(),
        error,
    };
    let channel = super::client::connect(path, config.connect_timeout)
        .await
        .map_err(|e| match e {
            // The path is in this error's own message already.
            SourceError::Connect { error, .. } => api_error(super::root_cause(error.as_ref())),
            other => api_error(other.to_string()),
        })?;
    let interceptor = |mut request: tonic::Request<()>| {
        // The Workload API's own SSRF guard.
        request.metadata_mut().insert(
            "workload.spiffe.io",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        Ok(request)
    };
    let mut client = SpiffeWorkloadApiClient::with_interceptor(channel, interceptor);
    let first = async {
        let mut stream = client
            .fetch_x509svid(X509svidRequest {})
            .await?
            .into_inner();
        stream.message().await
    };
    let response = match tokio::time::timeout(config.connect_timeout, first).await {
        Err(_) => {
            return Err(api_error(format!(
                "no answer within {:?}",
                config.connect_timeout
            )));
        }
        Ok(Err(status)) if status.code() == tonic::Code::PermissionDenied => {
            return Err(DialError::NoSvid(format!(
                "the Workload API answered PermissionDenied: {}",
                status.message()
            )));
        }
        Ok(Err(status)) => return Err(api_error(status.to_string())),
        Ok(Ok(None)) => return Err(api_error("closed the stream".into())),
        Ok(Ok(Some(response))) => response,
    };
    let wanted = config.spiffe_id.as_ref().map(SpiffeId::as_str);
    let Some(svid) = response
        .svids
        .into_iter()
        .find(|s| wanted.is_none_or(|w| s.spiffe_id == w))
    else {
        return Err(DialError::NoSvid(match wanted {
            Some(w) => format!("the Workload API issues the daemon no SVID named {w}"),
            None => "the Workload API issues the daemon no SVID".into(),
        }));
    };
    let key = Zeroizing::new(svid.x509_svid_key);
    let spiffe_id =
        SpiffeId::parse(&svid.spiffe_id).map_err(|e| DialError::BadSvid(e.to_string()))?;
    let certs = |der: &[u8], what: &str| -> Result<Vec<CertificateDer<'static>>, DialError> {
        let certs =
            split_der_certificates(der).map_err(|e| DialError::BadSvid(format!("{what}: {e}")))?;
        if certs.is_empty() {
            return Err(DialError::BadSvid(format!("{what} is empty")));
        }
        Ok(certs.into_iter().map(CertificateDer::from).collect())
    };
    Ok(OwnSvid {
        chain: certs(&svid.x509_svid, "certificate chain")?,
        bundle: certs(&svid.bundle, "bundle")?,
        spiffe_id,
        key,
    })
}

fn tls_config(own: &OwnSvid) -> Result<ClientConfig, DialError> {
    let anchors = own
        .bundle
        .iter()
        .map(|c| {
            webpki::anchor_from_trusted_cert(c)
                .map(|a| a.to_owned())
                .map_err(|e| DialError::BadSvid(format!("bundle certificate: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let verifier = AgentVerifier {
        anchors,
        trust_domain: own.spiffe_id.trust_domain().clone(),
    };
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(own.key.to_vec()));
    let mut config = ClientConfig::builder_with_provider(PROVIDER.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DialError::BadSvid(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier(verifier)))
        .with_client_auth_cert(own.chain.clone(), key)
        .map_err(|e| DialError::BadSvid(format!("key or chain: {e}")))?;
    // gRPC over TLS negotiates HTTP/2 by ALPN; Go's gRPC server insists on it.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts the agent's certificate when it chains to the daemon's trust domain bundle and its
/// SPIFFE ID is in that trust domain (the agent serves its own SVID).
#[derive(Debug)]
struct AgentVerifier {
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    trust_domain: TrustDomain,
}

impl ServerCertCheck for AgentVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let invalid = |e: String| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(std::io::Error::other(e)),
            )))
        };
        let cert =
            webpki::EndEntityCert::try_from(end_entity).map_err(|e| invalid(e.to_string()))?;
        cert.verify_for_usage(
            PROVIDER.signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| invalid(format!("the agent's certificate: {e}")))?;
        match uri_san(end_entity) {
            Some(id) if id.trust_domain() == &self.trust_domain => Ok(()),
            Some(id) => Err(invalid(format!(
                "the agent's SPIFFE ID {id} is not in trust domain {}",
                self.trust_domain
            ))),
            None => Err(invalid("the agent's certificate names no SPIFFE ID".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::spiffe_proto::broker::Jwtsvid;
    use super::*;
    use crate::spire::Selector;

    fn wire_jwt(id: &str, claims: &str) -> Jwtsvid {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        Jwtsvid {
            spiffe_id: id.into(),
            svid: format!(
                "{}.{}.{}",
                b64(r#"{"alg":"ES256"}"#),
                b64(claims),
                b64("sig")
            ),
            hint: String::new(),
        }
    }

    #[test]
    fn broker_jwt_svids_take_their_times_from_the_token_and_bad_ones_are_dropped() {
        let response = FetchJwtsvidResponse {
            svids: vec![
                wire_jwt("spiffe://example.org/web", r#"{"exp":200,"iat":100}"#),
                wire_jwt("spiffe://example.org/no-iat", r#"{"exp":200}"#),
                wire_jwt("spiffe://example.org/no-exp", r#"{"iat":100}"#),
                wire_jwt("spiffe://example.org/backwards", r#"{"exp":100,"iat":200}"#),
                wire_jwt("not an id", r#"{"exp":200,"iat":100}"#),
                Jwtsvid {
                    svid: "aGVh.cGF5\n.c2ln".into(),
                    ..wire_jwt("spiffe://example.org/newline", "{}")
                },
            ],
        };
        let svids = jwt_svids(response, 150);
        let got: Vec<_> = svids
            .iter()
            .map(|s| (s.spiffe_id.as_str(), s.issued_at, s.expires_at))
            .collect();
        assert_eq!(
            got,
            [
                ("spiffe://example.org/web", 100, 200),
                ("spiffe://example.org/no-iat", 150, 200)
            ]
        );
    }

    fn decode_pod(workload: &Workload) -> KubernetesObjectReference {
        let any = reference(workload).unwrap().reference.unwrap();
        assert_eq!(any.type_url, OBJECT_REFERENCE_TYPE);
        KubernetesObjectReference::decode(&any.value[..]).unwrap()
    }

    #[test]
    fn pids_become_pid_references_and_bad_ones_are_refused() {
        let any = reference(&Workload::Pid(42)).unwrap().reference.unwrap();
        assert_eq!(any.type_url, PID_REFERENCE_TYPE);
        assert_eq!(
            WorkloadPidReference::decode(&any.value[..]).unwrap().pid,
            42
        );
        for bad in [Workload::Pid(0), Workload::Pid(-1)] {
            assert_eq!(reference(&bad).unwrap_err().kind(), "invalid_workload");
        }
    }

    #[test]
    fn selector_sets_name_their_pod_by_key_and_uid() {
        let set = Workload::Selectors(vec![
            Selector::new("k8s", "ns:payments"),
            Selector::new("k8s", "sa:api"),
            Selector::new("k8s", "pod-name:api-0"),
            Selector::new("k8s", "pod-uid:3f1c2a9e-8b7d-4e6f-a1b2-c3d4e5f60718"),
            Selector::new("k8s", "container-name:main"),
        ]);
        let pod = decode_pod(&set);
        let t = pod.r#type.unwrap();
        assert_eq!((t.plural.as_str(), t.group.as_str()), ("pods", "core"));
        let key = pod.key.unwrap();
        assert_eq!(
            (key.namespace.as_str(), key.name.as_str()),
            ("payments", "api-0")
        );
        assert_eq!(pod.uid, "3f1c2a9e-8b7d-4e6f-a1b2-c3d4e5f60718");

        let by_uid = decode_pod(&Workload::Selectors(vec![Selector::new(
            "k8s",
            "pod-uid:u1",
        )]));
        assert!(by_uid.key.is_none());
        assert_eq!(by_uid.uid, "u1");

        let err = reference(&Workload::Selectors(vec![
            Selector::new("k8s", "ns:a"),
            Selector::new("unix", "pod-name:b"),
        ]))
        .unwrap_err();
        assert_eq!(err.kind(), "invalid_workload");
        assert!(err.to_string().contains("k8s:pod-uid"), "{err}");
    }

    #[test]
    fn the_agents_refusals_of_the_broker_are_classified() {
        for (code, message, refusal) in [
            (
                tonic::Code::PermissionDenied,
                "broker \"spiffe://td/nii\" is not allowed to use reference type \"type.googleapis.com/spiffe.broker.KubernetesObjectReference\"",
                Some(DelegateRefusal::ReferenceTypeNotAllowed),
            ),
            (
                tonic::Code::PermissionDenied,
                "broker \"spiffe://td/nii\" is not configured",
                Some(DelegateRefusal::BrokerNotInAttestor),
            ),
            (
                tonic::Code::Internal,
                "broker configuration missing",
                Some(DelegateRefusal::BrokerNotInAttestor),
            ),
            (tonic::Code::NotFound, "pod not found", None),
            (tonic::Code::PermissionDenied, "workload not entitled", None),
        ] {
            let err = status_error(tonic::Status::new(code, message));
            assert_eq!(err.refusal(), refusal, "{message}");
            assert!(!err.is_retryable() || refusal.is_none(), "{message}");
        }
    }

    #[test]
    fn a_rejected_client_certificate_is_a_broker_not_listed() {
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
        );
        let (refusal, message) = refusal_in_chain(&alert).unwrap();
        assert_eq!(refusal, DelegateRefusal::BrokerNotListed);
        assert!(message.contains("BadCertificate"), "{message}");
        let other = std::io::Error::other("connection refused");
        assert!(refusal_in_chain(&other).is_none());
        let text_only = std::io::Error::other("received fatal alert: BadCertificate");
        assert_eq!(
            refusal_in_chain(&text_only).map(|r| r.0),
            Some(DelegateRefusal::BrokerNotListed)
        );
        let unrelated = std::io::Error::other("received fatal alert: DecodeError");
        assert!(refusal_in_chain(&unrelated).is_none());
    }
}
