//! `/healthz`, `/readyz` and `/metrics` over a minimal HTTP/1.1 server: three fixed GET
//! endpoints do not justify an HTTP stack in a daemon sized in single MiB.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// Serves until `shutdown`. Readiness: registered with the runtime and the agent answers.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        let (mut stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = respond(path, &metrics);
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(error) = stream.write_all(response.as_bytes()).await {
                debug!(%peer, %error, "writing an HTTP response failed");
            }
        });
    }
}

pub fn respond(path: &str, metrics: &Metrics) -> (&'static str, String) {
    match path {
        "/healthz" => ("200 OK", "ok\n".into()),
        "/readyz" => {
            let (nri, agent) = (metrics.nri_ready(), metrics.agent_ready());
            let mut body = format!("nri: {}\nagent: {}", word(nri), word(agent));
            // Say which deployment mistake it is and how to fix it, not just "not ready".
            if let Some(refusal) = metrics.agent_refusal() {
                body.push_str(&format!(" ({}): {refusal}", refusal.kind()));
            }
            body.push('\n');
            let refused = metrics.refused();
            if refused > 0 {
                body.push_str(&format!("refused containers: {refused}\n"));
            }
            // In selectors mode the kubelet is as necessary as the agent.
            let kubelet = metrics.kubelet_ready();
            if let Some(k) = kubelet {
                body.push_str(&format!("kubelet: {}\n", word(k)));
            }
            if nri && agent && kubelet != Some(false) {
                ("200 OK", body)
            } else {
                ("503 Service Unavailable", body)
            }
        }
        "/metrics" => ("200 OK", metrics.render(crate::spire::unix_now())),
        _ => ("404 Not Found", "not found\n".into()),
    }
}

fn word(ok: bool) -> &'static str {
    if ok { "ready" } else { "not ready" }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spire::DelegateRefusal;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn ready_only_when_registered_and_the_agent_answers() {
        let m = Metrics::default();
        assert_eq!(respond("/readyz", &m).0, "503 Service Unavailable");
        m.set_nri_ready(true);
        assert_eq!(respond("/readyz", &m).0, "503 Service Unavailable");
        m.set_agent_ready(true);
        assert_eq!(respond("/readyz", &m).0, "200 OK");
        m.set_kubelet_ready(false);
        let (status, body) = respond("/readyz", &m);
        assert_eq!(status, "503 Service Unavailable");
        assert!(body.contains("kubelet: not ready"), "{body}");
        m.set_kubelet_ready(true);
        assert_eq!(respond("/readyz", &m).0, "200 OK");
        // The agent answers, but refuses the daemon: not ready, and the body says why.
        m.set_agent_refusal(Some(DelegateRefusal::NotAuthorized));
        let (status, body) = respond("/readyz", &m);
        assert_eq!(status, "503 Service Unavailable");
        assert!(
            body.contains("agent: not ready (not_authorized_delegate): ")
                && body.contains("authorized_delegates"),
            "{body}"
        );
        m.set_agent_refusal(Some(DelegateRefusal::NoEntry));
        let (_, body) = respond("/readyz", &m);
        assert!(
            body.contains("(no_delegate_entry)") && body.contains("registration entry"),
            "{body}"
        );
        m.set_agent_refusal(None);
        assert_eq!(respond("/readyz", &m).0, "200 OK");
        assert_eq!(respond("/healthz", &m).0, "200 OK");
        assert!(
            respond("/metrics", &m)
                .1
                .contains("nri_identity_served_total")
        );
        assert_eq!(respond("/nope", &m).0, "404 Not Found");
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_over_tcp_and_closes_each_connection() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(Metrics::default()), stop.clone()));

        // HTTP/1.0 and HTTP/1.1 clients (curl, kubelet probes, Prometheus) alike.
        let health = get(addr, "GET /healthz HTTP/1.0\r\n\r\n").await;
        assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
        assert!(health.ends_with("\r\n\r\nok\n"), "{health}");
        let ready = get(addr, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ready.starts_with("HTTP/1.1 503 "), "{ready}");
        assert!(ready.contains("nri: not ready\n"), "{ready}");
        let scrape = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            scrape
                .to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{scrape}"
        );
        assert!(
            scrape.contains("\nnri_identity_served_total 0\n"),
            "{scrape}"
        );
        let missing = get(addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        stop.cancel();
    }
}
