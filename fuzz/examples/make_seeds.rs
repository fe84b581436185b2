//! Writes the generated seeds of `fuzz/seeds/` (`cargo run --example make_seeds` in `fuzz/`):
//! NRI frames as the runtime sends them, agent messages with certificates minted by the
//! fake agent's CA, HTTP responses around a pod list. Hand-written seeds (annotations, the
//! pod lists, configurations) live next to them and are left alone.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use nri_identity_injector::spire::fake::TestCa;
use nri_identity_injector::spire::proto::api::agent::delegatedidentity::v1::{
    FetchJwtsviDsResponse, SubscribeToJwtBundlesResponse, SubscribeToX509BundlesResponse,
    SubscribeToX509sviDsResponse, X509svidWithKey,
};
use nri_identity_injector::spire::proto::api::types::{Jwtsvid, Spiffeid, X509svid};
use nri_identity_injector::spire::spiffe_proto::broker;
use nri_plugin::api::v1alpha1 as pb;
use nri_plugin::fuzzing::{
    Kind, PLUGIN_CONN, RUNTIME_CONN, Request, Response, encode, encode_frames,
};
use prost::Message;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn request(stream_id: u32, method: &str, payload: Vec<u8>, out: &mut Vec<u8>) {
    let r = Request {
        service: "nri.pkg.api.v1alpha1.Plugin".into(),
        method: method.into(),
        payload,
        timeout_nano: 2_000_000_000,
        metadata: Vec::new(),
    };
    encode_frames(
        PLUGIN_CONN,
        &encode(stream_id, Kind::Request, &r.encode_to_vec()),
        out,
    );
}

fn pod() -> pb::PodSandbox {
    pb::PodSandbox {
        id: "4f3a7c1e9b".into(),
        name: "web".into(),
        uid: "8c4e1f2a-53c9-4d1b-9a59-0d3f0c7f4b21".into(),
        namespace: "default".into(),
        runtime_handler: "runc".into(),
        labels: [
            ("app".to_owned(), "web".to_owned()),
            (
                "io.kubernetes.pod.namespace".to_owned(),
                "default".to_owned(),
            ),
        ]
        .into(),
        annotations: [(
            "identity.noderesource.dev/container.app".to_owned(),
            "- spire_agent_address: /run/spire/admin/admin.sock\n  cert_dir: /var/certs\n"
                .to_owned(),
        )]
        .into(),
        ..Default::default()
    }
}

fn container(state: i32) -> pb::Container {
    pb::Container {
        id: "0d9e8f7a6b5c".into(),
        pod_sandbox_id: "4f3a7c1e9b".into(),
        name: "app".into(),
        state,
        pid: 4242,
        image: Some(pb::Image {
            name: "registry.example/app:1".into(),
            ..Default::default()
        }),
        mounts: vec![pb::Mount {
            destination: "/var/certs".into(),
            r#type: "bind".into(),
            source: "/run/nri-identity-injector/8c4e1f2a-53c9-4d1b-9a59-0d3f0c7f4b21/0d9e8f7a6b5c"
                .into(),
            options: vec!["rbind".into(), "ro".into()],
        }],
        ..Default::default()
    }
}

fn nri(dir: &Path) {
    // The runtime's side of a whole session: the RegisterPlugin reply, Configure,
    // Synchronize, then a container's life.
    let mut s = Vec::new();
    let reply = Response {
        status: None,
        payload: pb::Empty {}.encode_to_vec(),
    };
    encode_frames(
        RUNTIME_CONN,
        &encode(1, Kind::Response, &reply.encode_to_vec()),
        &mut s,
    );
    let configure = pb::ConfigureRequest {
        config: String::new(),
        runtime_name: "containerd".into(),
        runtime_version: "2.3.4".into(),
        registration_timeout: 5000,
        request_timeout: 2000,
        nri_version: "v0.12.0".into(),
    };
    request(1, "Configure", configure.encode_to_vec(), &mut s);
    let sync = pb::SynchronizeRequest {
        pods: vec![pod()],
        containers: vec![container(2)],
        more: false,
    };
    request(3, "Synchronize", sync.encode_to_vec(), &mut s);
    write(dir, "handshake", &s);
    let mut life = Vec::new();
    let pair = |c| {
        pb::StartContainerRequest {
            pod: Some(pod()),
            container: Some(c),
        }
        .encode_to_vec()
    };
    request(5, "CreateContainer", pair(container(1)), &mut life);
    request(7, "StartContainer", pair(container(2)), &mut life);
    request(9, "StopContainer", pair(container(3)), &mut life);
    request(11, "RemoveContainer", pair(container(3)), &mut life);
    let change = pb::StateChangeEvent {
        event: 3,
        pod: Some(pod()),
        container: None,
    };
    request(13, "StateChange", change.encode_to_vec(), &mut life);
    write(dir, "container-life", &life);
    // One large message cut into 4096-byte frames, as the Go multiplexer writes it.
    let mut big = pod();
    big.annotations.insert("filler".into(), "x".repeat(10_000));
    let mut split = Vec::new();
    request(15, "RunPodSandbox", pair_of(big), &mut split);
    write(dir, "split-message", &split);
}

fn pair_of(pod: pb::PodSandbox) -> Vec<u8> {
    pb::RunPodSandboxRequest { pod: Some(pod) }.encode_to_vec()
}

fn spire(dir: &Path, der_dir: &Path) {
    let ca = TestCa::new("example.org").unwrap();
    let intermediate = ca.intermediate().unwrap();
    let other = TestCa::new("other.org").unwrap();
    let svid = ca
        .mint("/ns/default/sa/web", Duration::from_secs(3600))
        .unwrap();
    let chained = intermediate.mint("/db", Duration::from_secs(3600)).unwrap();
    let wire = |s: &nri_identity_injector::spire::X509Svid, td: &str, path: &str| X509svidWithKey {
        x509_svid: Some(X509svid {
            cert_chain: s.cert_chain.clone(),
            id: Some(Spiffeid {
                trust_domain: td.into(),
                path: path.into(),
            }),
            expires_at: s.expires_at,
            hint: "web".into(),
        }),
        x509_svid_key: s.private_key.to_vec(),
    };
    let svids = SubscribeToX509sviDsResponse {
        x509_svids: vec![
            wire(&svid, "example.org", "/ns/default/sa/web"),
            wire(&chained, "example.org", "/db"),
        ],
        federates_with: vec!["spiffe://other.org".into()],
    }
    .encode_to_vec();
    let mut ca_certificates = std::collections::BTreeMap::new();
    ca_certificates.insert(ca.trust_domain_id(), ca.cert_der().to_vec());
    ca_certificates.insert(other.trust_domain_id(), other.cert_der().to_vec());
    let bundles = SubscribeToX509BundlesResponse { ca_certificates }.encode_to_vec();
    for (name, files) in [("spiffe-helper", 0u8), ("combined-append", 3)] {
        let mut seed = vec![files];
        seed.extend_from_slice(&(svids.len() as u16).to_be_bytes());
        seed.extend_from_slice(&svids);
        seed.extend_from_slice(&bundles);
        write(dir, name, &seed);
    }
    let mut none = vec![0u8];
    let empty = SubscribeToX509sviDsResponse::default().encode_to_vec();
    none.extend_from_slice(&(empty.len() as u16).to_be_bytes());
    none.extend_from_slice(&empty);
    none.extend_from_slice(&bundles);
    write(dir, "no-entry", &none);
    // Bundles as the agent sends them: DER certificates back to back.
    let mut two = vec![0u8];
    two.extend_from_slice(ca.cert_der());
    two.extend_from_slice(intermediate.cert_der());
    write(der_dir, "two-certificates", &two);
    let mut one = vec![0u8];
    one.extend_from_slice(other.cert_der());
    write(der_dir, "one-certificate", &one);
}

fn http(dir: &Path, pod_list: &[u8]) {
    // flags (0: clean close, raw), limit 0xffff, read 0 (all at once) or 7 bytes at a time.
    let head = |flags: u8, piece: u8| vec![flags, 0xff, 0xff, piece];
    let mut cl = head(0, 0);
    cl.extend_from_slice(
        format!(
            "HTTP/1.1 200 OK\r\nAudit-Id: 2c1d0c4c\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            pod_list.len()
        )
        .as_bytes(),
    );
    cl.extend_from_slice(pod_list);
    write(dir, "content-length", &cl);
    let mut chunked = head(1, 7);
    chunked.extend_from_slice(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    for part in pod_list.chunks(100) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    write(dir, "chunked-cut", &chunked);
    let mut refused = head(0, 0);
    refused.extend_from_slice(
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 96\r\n\r\nForbidden (user=system:serviceaccount:nri:identity, verb=get, resource=nodes, subresource=proxy)",
    );
    write(dir, "forbidden", &refused);
}

/// The guard's files: the test certificates and keys of `src/guard/testdata` in every layout.
fn guard(dir: &Path) {
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src/guard/testdata");
    let read = |name: &str| std::fs::read(testdata.join(name)).unwrap();
    let der = |pem: &[u8]| {
        let text = std::str::from_utf8(pem).unwrap();
        let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    };
    let seed = |flags: u8, cert: &[u8], key: Option<&[u8]>, id: &str| {
        let mut out = vec![flags];
        for part in std::iter::once(cert).chain(key) {
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out.extend_from_slice(id.as_bytes());
        out
    };
    for (name, cert, key) in [
        ("rsa", "rsa_cert.pem", "rsa_key.pem"),
        ("ed", "ed_cert.pem", "ed_key.pem"),
        ("rsa-other-key", "rsa_cert.pem", "rsa_other_key.pem"),
    ] {
        let (cert, key) = (read(cert), read(key));
        write(
            dir,
            name,
            &seed(2, &cert, Some(&key), "spiffe://example.org/ed"),
        );
        write(
            dir,
            &format!("{name}-der"),
            &seed(6, &der(&cert), Some(&der(&key)), "spiffe://example.org/ed"),
        );
        write(
            dir,
            &format!("{name}-combined"),
            &seed(1, &[key, cert].concat(), None, ""),
        );
    }
}

/// Input layout of the agent message targets: file choice, the first message's length, the
/// first message, the second.
fn two_messages(files: u8, first: &[u8], second: &[u8]) -> Vec<u8> {
    let mut seed = vec![files];
    seed.extend_from_slice(&(first.len() as u16).to_be_bytes());
    seed.extend_from_slice(first);
    seed.extend_from_slice(second);
    seed
}

fn jwt(dir: &Path) {
    // Tokens shaped as SPIRE's (header.payload.signature, base64url); the signature is not
    // checked by the daemon, which only passes the token on.
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let token = |sub: &str| {
        format!(
            "{}.{}.{}",
            b64(r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#),
            b64(&format!(
                r#"{{"aud":["a"],"exp":1900000000,"iat":1800000000,"sub":"{sub}"}}"#
            )),
            b64("not a real signature, 64 bytes long......................!")
        )
    };
    let wire = |path: &str| Jwtsvid {
        token: token(&format!("spiffe://example.org{path}")),
        id: Some(Spiffeid {
            trust_domain: "example.org".into(),
            path: path.into(),
        }),
        expires_at: 1_900_000_000,
        issued_at: 1_800_000_000,
        hint: String::new(),
    };
    let svids = FetchJwtsviDsResponse {
        svids: vec![wire("/ns/default/sa/web"), wire("/db")],
    }
    .encode_to_vec();
    let jwks = br#"{"keys":[{"kty":"EC","kid":"k1","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","use":"jwt-svid"}]}"#;
    let mut bundles = std::collections::BTreeMap::new();
    bundles.insert("spiffe://example.org".to_string(), jwks.to_vec());
    bundles.insert("spiffe://other.org".to_string(), br#"{"keys":[]}"#.to_vec());
    let bundles = SubscribeToJwtBundlesResponse { bundles }.encode_to_vec();
    write(dir, "two-svids", &two_messages(0, &svids, &bundles));
    write(dir, "named-files", &two_messages(1, &svids, &bundles));
    let none = FetchJwtsviDsResponse::default().encode_to_vec();
    write(dir, "no-svid", &two_messages(2, &none, &bundles));
    // The Broker API's answer (the high bit of the first byte): the ID as text, no times.
    let wire = |path: &str| broker::Jwtsvid {
        spiffe_id: format!("spiffe://example.org{path}"),
        svid: token(&format!("spiffe://example.org{path}")),
        hint: String::new(),
    };
    let svids = broker::FetchJwtsvidResponse {
        svids: vec![wire("/ns/default/sa/web"), wire("/db")],
    }
    .encode_to_vec();
    let mut jwks_by_td = std::collections::BTreeMap::new();
    jwks_by_td.insert("spiffe://example.org".to_string(), jwks.to_vec());
    let bundles = broker::SubscribeToJwtBundlesResponse {
        bundles: jwks_by_td,
    }
    .encode_to_vec();
    write(
        dir,
        "broker-two-svids",
        &two_messages(0x80, &svids, &bundles),
    );
}

fn broker(dir: &Path) {
    let ca = TestCa::new("example.org").unwrap();
    let intermediate = ca.intermediate().unwrap();
    let other = TestCa::new("other.org").unwrap();
    let svid = ca
        .mint("/ns/default/sa/web", Duration::from_secs(3600))
        .unwrap();
    let chained = intermediate.mint("/db", Duration::from_secs(3600)).unwrap();
    let wire = |s: &nri_identity_injector::spire::X509Svid| broker::X509svid {
        spiffe_id: s.spiffe_id.as_str().into(),
        x509_svid: s.cert_chain.concat(),
        x509_svid_key: s.private_key.to_vec(),
        bundle: ca.cert_der().to_vec(),
        hint: "web".into(),
    };
    let mut federated_bundles = std::collections::BTreeMap::new();
    federated_bundles.insert(other.trust_domain_id(), other.cert_der().to_vec());
    let svids = broker::SubscribeToX509svidResponse {
        svids: vec![wire(&svid), wire(&chained)],
        federated_bundles,
    }
    .encode_to_vec();
    let mut bundles = std::collections::BTreeMap::new();
    bundles.insert(ca.trust_domain_id(), ca.cert_der().to_vec());
    bundles.insert(other.trust_domain_id(), other.cert_der().to_vec());
    let bundles = broker::SubscribeToX509BundlesResponse { bundles }.encode_to_vec();
    write(dir, "spiffe-helper", &two_messages(0, &svids, &bundles));
    write(dir, "combined-append", &two_messages(3, &svids, &bundles));
}

/// Writes every generated seed, or only those of the targets named as arguments (the others'
/// certificates and keys would otherwise be minted anew).
fn main() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let only: Vec<String> = std::env::args().skip(1).collect();
    let wanted = |t: &str| only.is_empty() || only.iter().any(|o| o == t);
    if wanted("nri_frames") {
        nri(&seeds.join("nri_frames"));
    }
    if wanted("spire_response") || wanted("spire_der") {
        spire(&seeds.join("spire_response"), &seeds.join("spire_der"));
    }
    if wanted("spire_jwt") {
        jwt(&seeds.join("spire_jwt"));
    }
    if wanted("broker_response") {
        broker(&seeds.join("broker_response"));
    }
    if wanted("kubelet_http") {
        let pod_list = std::fs::read(seeds.join("kubelet_pods/deployment-and-static")).unwrap();
        http(&seeds.join("kubelet_http"), &pod_list);
    }
    if wanted("guard_files") {
        guard(&seeds.join("guard_files"));
    }
    println!("seeds written under {}", seeds.display());
}
