//! The Broker API source against a real SPIRE agent with its broker endpoint enabled: the
//! daemon's client, authenticated by its own SVID from the agent's Workload API, gets a
//! workload's identity by PID reference (X.509 and JWT); a broker the agent does not list is refused in the
//! TLS handshake, and a listed broker using a reference type it may not use is refused too,
//! each with the refusal that names the fix.
//!
//! Needs root (workloads run under other uids) and SPIRE v1.15.2 or later: run by name with
//! `NII_SPIRE_BROKER_DIR=<dir with spire-server and spire-agent> cargo test --test integration broker_spire
//! -- --ignored` (`tests/e2e/broker.sh` builds SPIRE and does this). Takes about 10 s.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nri_identity_injector::spiffe::SpiffeId;
use nri_identity_injector::spire::{
    BrokerApi, BrokerConfig, DelegateRefusal, IdentitySource, SourceError, Workload,
};
use tokio_stream::StreamExt;

const TD: &str = "example.org";
const BROKER: &str = "spiffe://example.org/nri-identity-injector";
const PODS_ONLY: &str = "spiffe://example.org/pods-only-broker";
const INTRUDER: &str = "spiffe://example.org/intruder";
const WORKLOAD: &str = "spiffe://example.org/workload";
const WORKLOAD_UID: u32 = 4242;

struct Spire {
    dir: PathBuf,
    bin: PathBuf,
    children: Vec<Child>,
}

impl Drop for Spire {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Spire {
    fn server_cli(&self, args: &[&str]) -> String {
        let out = Command::new(self.bin.join("spire-server"))
            .args(args)
            .arg("-socketPath")
            .arg(self.dir.join("server.sock"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "spire-server {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn entry(&self, id: &str, selector: &str) {
        self.server_cli(&[
            "entry",
            "create",
            "-parentID",
            "spiffe://example.org/node",
            "-spiffeID",
            id,
            "-selector",
            selector,
        ]);
    }

    fn spawn(&mut self, program: &str, args: &[&str], log: &str) {
        let log = std::fs::File::create(self.dir.join(log)).unwrap();
        let child = Command::new(self.bin.join(program))
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    fn start() -> Spire {
        let bin = PathBuf::from(
            std::env::var("NII_SPIRE_BROKER_DIR")
                .expect("NII_SPIRE_BROKER_DIR must name a SPIRE >= v1.15.2 build"),
        );
        let dir = PathBuf::from(format!("/tmp/nii-broker-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
        std::fs::write(
            dir.join("server.conf"),
            format!(
                r#"server {{
  bind_address = "127.0.0.1"
  bind_port = "{port}"
  socket_path = "{d}/server.sock"
  trust_domain = "{TD}"
  data_dir = "{d}/data/server"
  log_level = "DEBUG"
}}
plugins {{
  DataStore "sql" {{ plugin_data {{
    database_type = "sqlite3"
    connection_string = "{d}/data/server/datastore.sqlite3"
  }} }}
  NodeAttestor "join_token" {{ plugin_data {{}} }}
  KeyManager "memory" {{ plugin_data {{}} }}
}}
"#
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("agent.conf"),
            format!(
                r#"agent {{
  data_dir = "{d}/data/agent"
  log_level = "DEBUG"
  server_address = "127.0.0.1"
  server_port = "{port}"
  trust_domain = "{TD}"
  socket_path = "{d}/public/api.sock"
  trust_bundle_path = "{d}/bundle.pem"
  experimental {{
    sync_interval = "1s"
    broker {{
      socket_path = "{d}/broker/broker.sock"
      brokers = [
        {{ id = "{BROKER}", allowed_reference_types = [{{ type_url = "*" }}] }},
        {{ id = "{PODS_ONLY}", allowed_reference_types = [{{ type_url = "type.googleapis.com/spiffe.broker.KubernetesObjectReference" }}] }},
      ]
    }}
  }}
}}
plugins {{
  NodeAttestor "join_token" {{ plugin_data {{}} }}
  KeyManager "memory" {{ plugin_data {{}} }}
  WorkloadAttestor "unix" {{ plugin_data {{}} }}
}}
"#
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("public")).unwrap();
        std::fs::create_dir_all(dir.join("broker")).unwrap();
        let mut spire = Spire {
            dir,
            bin,
            children: Vec::new(),
        };
        let conf = spire.dir.join("server.conf").display().to_string();
        spire.spawn("spire-server", &["run", "-config", &conf], "server.log");
        wait_until("the SPIRE server is healthy", || {
            Command::new(spire.bin.join("spire-server"))
                .args(["healthcheck", "-socketPath"])
                .arg(spire.dir.join("server.sock"))
                .output()
                .is_ok_and(|o| o.status.success())
        });
        let bundle = spire.server_cli(&["bundle", "show"]);
        std::fs::write(spire.dir.join("bundle.pem"), bundle).unwrap();
        let token = spire.server_cli(&[
            "token",
            "generate",
            "-spiffeID",
            "spiffe://example.org/node",
        ]);
        let token = token
            .lines()
            .find_map(|l| l.strip_prefix("Token: "))
            .expect("a join token")
            .trim()
            .to_owned();
        let conf = spire.dir.join("agent.conf").display().to_string();
        spire.spawn(
            "spire-agent",
            &["run", "-config", &conf, "-joinToken", &token],
            "agent.log",
        );
        wait_until("the SPIRE agent is healthy", || {
            Command::new(spire.bin.join("spire-agent"))
                .args(["healthcheck", "-socketPath"])
                .arg(spire.dir.join("public/api.sock"))
                .output()
                .is_ok_and(|o| o.status.success())
        });
        spire
    }
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: timed out"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn source(spire: &Spire, id: &str) -> BrokerApi {
    let mut config = BrokerConfig::new(spire.dir.join("public/api.sock"));
    config.spiffe_id = Some(SpiffeId::parse(id).unwrap());
    BrokerApi::new(config)
}

/// Retries while the agent has not synced the entries yet (the daemon has no SVID, or the
/// workload none).
async fn eventually<T>(
    what: &str,
    mut f: impl AsyncFnMut() -> Result<Option<T>, SourceError>,
) -> T {
    let start = Instant::now();
    loop {
        match f().await {
            Ok(Some(t)) => return t,
            Ok(None) => {}
            Err(e) if e.refusal() == Some(DelegateRefusal::NoBrokerSvid) => {}
            Err(e) => panic!("{what}: {e}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: timed out"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
#[ignore = "needs root and SPIRE >= v1.15.2 (NII_SPIRE_BROKER_DIR); run by tests/e2e/broker.sh"]
async fn a_listed_broker_gets_a_workloads_identity_and_others_are_refused() {
    let spire = Spire::start();
    for (id, selector) in [
        (BROKER, "unix:uid:0"),
        (PODS_ONLY, "unix:uid:0"),
        (INTRUDER, "unix:uid:0"),
    ] {
        spire.entry(id, selector);
    }
    spire.entry(WORKLOAD, &format!("unix:uid:{WORKLOAD_UID}"));
    let mut workload = Command::new("setpriv")
        .args([
            &format!("--reuid={WORKLOAD_UID}"),
            &format!("--regid={WORKLOAD_UID}"),
            "--clear-groups",
            "sleep",
            "120",
        ])
        .spawn()
        .unwrap();
    let pid = workload.id() as i32;
    let broker_socket = spire.dir.join("broker/broker.sock");
    let broker_socket: &Path = &broker_socket;

    // The listed broker: probe, bundles, and the workload's SVID by PID reference.
    let api = source(&spire, BROKER);
    eventually("probe", async || api.probe(broker_socket).await.map(Some)).await;
    let mut bundles = api.subscribe_bundles(broker_socket).await.unwrap();
    let set = bundles.next().await.unwrap().unwrap();
    assert!(
        set.bundles.keys().any(|td| td.name() == TD),
        "bundles: {set:?}"
    );
    let update = eventually("the workload's SVID", async || {
        let mut stream = api
            .subscribe_svids(broker_socket, &Workload::Pid(pid))
            .await?;
        let update = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a first message")
            .expect("an item")?;
        Ok((!update.svids.is_empty()).then_some(update))
    })
    .await;
    let svid = &update.svids[0];
    assert_eq!(svid.spiffe_id.as_str(), WORKLOAD);
    assert!(!svid.cert_chain.is_empty() && !svid.private_key.is_empty());
    assert!(
        svid.expires_at > 1_700_000_000,
        "NotAfter read from the leaf"
    );

    // The workload's JWT-SVID for an audience, its times read from the token, and the JWKS of
    // its trust domain.
    let audience = ["e2e-api".to_owned()];
    let jwts = eventually("the workload's JWT-SVID", async || {
        let svids = api
            .fetch_jwt_svids(broker_socket, &Workload::Pid(pid), &audience)
            .await?;
        Ok((!svids.is_empty()).then_some(svids))
    })
    .await;
    assert_eq!(jwts[0].spiffe_id.as_str(), WORKLOAD);
    assert!(
        jwts[0].issued_at > 1_700_000_000 && jwts[0].expires_at > jwts[0].issued_at,
        "iat {} exp {}",
        jwts[0].issued_at,
        jwts[0].expires_at
    );
    assert_eq!(jwts[0].token.split('.').count(), 3);
    let mut jwt_bundles = api.subscribe_jwt_bundles(broker_socket).await.unwrap();
    let jwks = jwt_bundles.next().await.unwrap().unwrap();
    let (_, doc) = jwks
        .bundles
        .iter()
        .find(|(td, _)| td.name() == TD)
        .expect("the JWKS of the workload's trust domain");
    let doc: serde_json::Value = serde_json::from_slice(doc).unwrap();
    assert!(
        doc["keys"].as_array().is_some_and(|k| !k.is_empty()),
        "{doc}"
    );

    // A broker that is not listed: the agent rejects its certificate in the handshake.
    let intruder = source(&spire, INTRUDER);
    let err = eventually("the intruder's refusal", async || {
        match intruder.probe(broker_socket).await {
            Ok(()) => panic!("an unlisted broker was served"),
            Err(e) if e.refusal() == Some(DelegateRefusal::BrokerNotListed) => Ok(Some(e)),
            Err(e) => Err(e),
        }
    })
    .await;
    assert!(!err.is_retryable());
    assert!(
        err.to_string().contains("experimental.broker.brokers"),
        "{err}"
    );

    // A listed broker that may use pod references only: PID references are refused.
    let pods_only = source(&spire, PODS_ONLY);
    let err = eventually("the PID reference's refusal", async || {
        match pods_only
            .subscribe_svids(broker_socket, &Workload::Pid(pid))
            .await
        {
            Ok(_) => panic!("a PID reference was served to a pods-only broker"),
            Err(e) if e.refusal() == Some(DelegateRefusal::ReferenceTypeNotAllowed) => Ok(Some(e)),
            Err(e) => Err(e),
        }
    })
    .await;
    assert!(err.to_string().contains("allowed_reference_types"), "{err}");

    let _ = workload.kill();
    let _ = workload.wait();
}
