//! How the daemon reaches the kubelet: plain HTTP to the read-only port, or TLS to the
//! secure port authenticated by the daemon's service-account token or a client certificate.
//!
//! Credentials are read from disk for every connection rather than once: projected
//! service-account tokens are rotated by the kubelet (hourly by default), client
//! certificates and CA bundles are rotated too, and a connection is only made when the pod
//! cache misses, so the cost is a few small file reads per new pod.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::tls::{PROVIDER, ServerCertCheck, Verifier};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// The read-only port: no authentication, no TLS.
    Http,
    /// The secure port.
    Https,
}

/// `http://host:port` (read-only port, default 10255) or `https://host:port` (secure port,
/// default 10250). Nothing else: the path is always `/pods`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KubeletUrl {
    pub scheme: Scheme,
    /// A DNS name or an IP address (without brackets).
    pub host: String,
    pub port: u16,
}

impl KubeletUrl {
    /// `host:port` as written in a URL authority or a `Host` header.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for KubeletUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        write!(f, "{scheme}://{}", self.authority())
    }
}

impl FromStr for KubeletUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("{s:?} is not a URL (http://host:port or https://host:port)"))?;
        let scheme = match scheme {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => return Err(format!("scheme {other:?} is neither http nor https")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "{s:?}: give only scheme, host and port (the path is always /pods)"
            ));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: unclosed [ in the host"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{s:?}: {host:?} is not an IPv6 address"));
            }
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| format!("{s:?}: expected :port after ]"))?,
                    ),
                ),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        // A host with a colon is an IPv6 address (bracketed or not): anything else would
        // print as `[host]:port` and not parse again.
        let host_ok = !host.is_empty()
            && if host.contains(':') {
                host.parse::<std::net::Ipv6Addr>().is_ok()
            } else {
                host.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            };
        if !host_ok {
            return Err(format!("{s:?}: {host:?} is not a host name or IP address"));
        }
        let port = match port {
            None => match scheme {
                Scheme::Http => 10255,
                Scheme::Https => 10250,
            },
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{s:?}: {p:?} is not a port"))?,
        };
        Ok(KubeletUrl {
            scheme,
            host: host.to_owned(),
            port,
        })
    }
}

impl TryFrom<String> for KubeletUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<KubeletUrl> for String {
    fn from(u: KubeletUrl) -> String {
        u.to_string()
    }
}

/// How the daemon proves itself to the secure port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    /// A bearer token file (the daemon's projected service-account token); the kubelet
    /// checks it with a TokenReview (`--authentication-token-webhook`).
    Token(PathBuf),
    /// A client certificate the kubelet's `--client-ca-file` accepts.
    Certificate { cert: PathBuf, key: PathBuf },
}

/// TLS settings for the secure port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// CA bundle the kubelet's serving certificate must chain to; `None` skips verification
    /// (kubelets with self-signed serving certificates).
    pub ca: Option<PathBuf>,
    /// The name the serving certificate must carry: a DNS name or an IP address.
    pub server_name: String,
    pub auth: ClientAuth,
}

/// Where the kubelet is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: KubeletUrl,
    /// Set exactly when the URL is `https`.
    pub tls: Option<TlsSettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{field} {}: {error}", path.display())]
    Read {
        field: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("{field} {}: {reason}", path.display())]
    Invalid {
        field: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("kubelet_server_name {0:?} is neither a DNS name nor an IP address")]
    ServerName(String),
    #[error("TLS client setup: {0}")]
    Tls(rustls::Error),
}

impl From<rustls::Error> for CredentialError {
    fn from(e: rustls::Error) -> Self {
        CredentialError::Tls(e)
    }
}

/// A connection's worth of loaded credentials.
pub(super) struct Prepared {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    pub bearer: Option<Zeroizing<String>>,
}

impl Endpoint {
    pub fn read_only(url: KubeletUrl) -> Self {
        Endpoint { url, tls: None }
    }

    /// Loads every credential once, so a daemon that could never authenticate fails at
    /// startup with the file at fault rather than at its first pod.
    pub fn check(&self) -> Result<(), CredentialError> {
        match &self.tls {
            Some(tls) => tls.prepare().map(drop),
            None => Ok(()),
        }
    }
}

impl TlsSettings {
    pub(super) fn prepare(&self) -> Result<Prepared, CredentialError> {
        let server_name = ServerName::try_from(self.server_name.clone())
            .map_err(|_| CredentialError::ServerName(self.server_name.clone()))?;
        let builder = ClientConfig::builder_with_provider(PROVIDER.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.ca {
            Some(path) => builder.with_root_certificates(roots(path)?),
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verifier(AnyServerCertificate))),
        };
        let (config, bearer) = match &self.auth {
            ClientAuth::Token(path) => (builder.with_no_client_auth(), Some(token(path)?)),
            ClientAuth::Certificate { cert, key } => {
                let chain = certificates("kubelet_certificate_path", cert)?;
                let key = private_key(key)?;
                (builder.with_client_auth_cert(chain, key)?, None)
            }
        };
        Ok(Prepared {
            config: Arc::new(config),
            server_name,
            bearer,
        })
    }
}

fn read(field: &'static str, path: &Path) -> Result<Zeroizing<Vec<u8>>, CredentialError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|error| CredentialError::Read {
            field,
            path: path.to_owned(),
            error,
        })
}

fn invalid(field: &'static str, path: &Path, reason: impl Into<String>) -> CredentialError {
    CredentialError::Invalid {
        field,
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, CredentialError> {
    let pem = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(field, path, format!("unreadable PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(field, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn roots(path: &Path) -> Result<RootCertStore, CredentialError> {
    let mut store = RootCertStore::empty();
    for cert in certificates("kubelet_ca_path", path)? {
        store
            .add(cert)
            .map_err(|e| invalid("kubelet_ca_path", path, format!("unusable CA: {e}")))?;
    }
    Ok(store)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, CredentialError> {
    let pem = read("kubelet_private_key_path", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        invalid(
            "kubelet_private_key_path",
            path,
            format!("no usable PEM private key: {e}"),
        )
    })
}

fn token(path: &Path) -> Result<Zeroizing<String>, CredentialError> {
    let raw = read("kubelet_token_path", path)?;
    let text = std::str::from_utf8(&raw)
        .map_err(|_| invalid("kubelet_token_path", path, "is not UTF-8"))?
        .trim();
    if text.is_empty() {
        return Err(invalid("kubelet_token_path", path, "is empty"));
    }
    // The token goes into a header line: anything but visible ASCII could split it.
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "kubelet_token_path",
            path,
            "holds characters a bearer token cannot have",
        ));
    }
    Ok(Zeroizing::new(text.to_owned()))
}

/// `kubelet_skip_verification`: any serving certificate is accepted, but the handshake's
/// signatures are still checked, so the peer must hold the key of the certificate it shows.
#[derive(Debug)]
struct AnyServerCertificate;

impl ServerCertCheck for AnyServerCertificate {
    fn check(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<(), rustls::Error> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum HttpError {
    /// The connection failed or broke.
    #[error("{0}")]
    Io(io::Error),
    /// The peer's answer is not valid HTTP/1.1, is cut short or is over the size limit.
    #[error("{0}")]
    Malformed(&'static str),
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        HttpError::Io(e)
    }
}

pub(super) struct Response {
    pub status_line: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn status(&self) -> Option<u16> {
        self.status_line.split_whitespace().nth(1)?.parse().ok()
    }
}

/// One `GET` on a fresh connection (`Connection: close`), reading at most `limit` body
/// bytes. Enough HTTP/1.1 for the kubelet: Content-Length, chunked, or close-delimited.
pub(super) async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    authority: &str,
    path: &str,
    bearer: Option<&str>,
    limit: usize,
) -> Result<Response, HttpError> {
    let mut request = Zeroizing::new(format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\nConnection: close\r\n"
    ));
    if let Some(token) = bearer {
        request.push_str("Authorization: Bearer ");
        request.push_str(token);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;

    let mut raw = Vec::new();
    // A TLS peer that closes without close_notify surfaces as UnexpectedEof: acceptable
    // once the framing below proves the body complete.
    let clean_eof = match (&mut stream)
        .take(limit as u64 + 64 * 1024)
        .read_to_end(&mut raw)
        .await
    {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => false,
        Err(e) => return Err(e.into()),
    };
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(HttpError::Malformed("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw.split_off(split + 4);
    let status_line = head.lines().next().unwrap_or("").to_owned();
    let has_status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .is_some_and(|code| code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()));
    if !has_status {
        return Err(HttpError::Malformed("no HTTP/1.x status line"));
    }
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let chunked =
        header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        body = dechunk(&body, limit).ok_or(HttpError::Malformed("bad chunked encoding"))?;
    } else if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| HttpError::Malformed("bad Content-Length"))?;
        if len > limit {
            return Err(HttpError::Malformed("body larger than the limit"));
        }
        if body.len() < len {
            return Err(HttpError::Malformed("body shorter than its Content-Length"));
        }
        body.truncate(len);
    } else if !clean_eof {
        return Err(HttpError::Malformed(
            "connection cut before the end of a body without length",
        ));
    }
    if body.len() > limit {
        return Err(HttpError::Malformed("body larger than the limit"));
    }
    Ok(Response { status_line, body })
}

/// Decodes an HTTP/1.1 chunked body of at most `limit` bytes.
pub(super) fn dechunk(mut body: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if body.len() < size.checked_add(2)? || out.len() + size > limit {
            return None;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}
