//! What the runtime sends on the NRI socket, decoded as the plugin decodes it: multiplexer
//! frames, ttrpc messages reassembled per connection, the ttrpc envelope, and the protobuf
//! message behind each method (the runtime's requests on connection 1, its replies on
//! connection 2) — then converted to what the daemon's engine sees.
//!
//! Holds: no panic, no allocation beyond the protocol's own limits (a 4 MiB frame, a 4 MiB
//! message); re-encoding what was decoded decodes to the same frames, messages and protobuf
//! values (so encoder and decoder agree on every boundary).

#![no_main]

use libfuzzer_sys::fuzz_target;
use nri_identity_injector::nri::{container_info, pod_info};
use nri_identity_injector_fuzz::ready;
use nri_plugin::api::v1alpha1 as pb;
use nri_plugin::fuzzing::{
    Decoder, MAX_MESSAGE, MAX_OUT_PAYLOAD, MUX_HEADER_LEN, Message as TtrpcMessage, PLUGIN_CONN,
    RUNTIME_CONN, Request, Response, TTRPC_HEADER_LEN, encode_frames, read_frame,
};
use prost::Message;

/// Decodes, re-encodes and decodes again: both decodings must agree.
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let again = M::decode(&m.encode_to_vec()[..]).expect("re-encoded message decodes");
    assert_eq!(m, again, "protobuf round trip");
    Some(m)
}

fn event_message(pod: Option<pb::PodSandbox>, container: Option<pb::Container>) {
    let pod = pod_info(&pod.unwrap_or_default());
    if let Some(c) = container {
        let c = container_info(&c);
        let _ = nri_identity_injector::annotation::lookup(&pod.annotations, &c.name);
    }
}

fn plugin_request(request: &Request) {
    let p = &request.payload[..];
    match request.method.as_str() {
        "Configure" => drop(round_trip::<pb::ConfigureRequest>(p)),
        "Synchronize" => {
            if let Some(s) = round_trip::<pb::SynchronizeRequest>(p) {
                for c in &s.containers {
                    let _ = container_info(c);
                }
                for pod in &s.pods {
                    let _ = pod_info(pod);
                }
            }
        }
        "StateChange" => {
            if let Some(e) = round_trip::<pb::StateChangeEvent>(p) {
                event_message(e.pod, e.container);
            }
        }
        "CreateContainer" => drop(round_trip::<pb::CreateContainerRequest>(p)),
        "UpdateContainer" => drop(round_trip::<pb::UpdateContainerRequest>(p)),
        "StopContainer" => drop(round_trip::<pb::StopContainerRequest>(p)),
        "UpdatePodSandbox" => drop(round_trip::<pb::UpdatePodSandboxRequest>(p)),
        _ => {
            // Every other event is {pod = 1, container = 2}: the plugin decodes them all so.
            if let Some(r) = round_trip::<pb::StartContainerRequest>(p) {
                event_message(r.pod, r.container);
            }
        }
    }
}

fn runtime_reply(response: &Response) {
    let p = &response.payload[..];
    let _ = round_trip::<pb::Empty>(p);
    let _ = round_trip::<pb::UpdateContainersResponse>(p);
}

/// The frames of a ttrpc message as the plugin's encoder writes them.
fn check_ttrpc(m: &TtrpcMessage) {
    let mut header = Vec::with_capacity(TTRPC_HEADER_LEN);
    header.extend_from_slice(&(m.payload.len() as u32).to_be_bytes());
    header.extend_from_slice(&m.stream_id.to_be_bytes());
    header.push(m.kind);
    header.push(0);
    let mut d = Decoder::default();
    d.push(&header);
    d.push(&m.payload);
    let again = d
        .next_message()
        .expect("re-encoded message")
        .expect("complete");
    assert_eq!(
        (again.stream_id, again.kind, &again.payload[..]),
        (m.stream_id, m.kind, &m.payload[..])
    );
    assert!(d.next_message().expect("no error").is_none());
}

fn check_mux(conn: u32, payload: &[u8]) {
    let mut framed = Vec::new();
    encode_frames(conn, payload, &mut framed);
    let mut reader = &framed[..];
    let mut joined = Vec::new();
    while let Some((c, p)) = ready(read_frame(&mut reader)).expect("own frames decode") {
        assert_eq!(c, conn);
        assert!(
            !p.is_empty() && p.len() <= MAX_OUT_PAYLOAD,
            "frame of {}",
            p.len()
        );
        joined.extend_from_slice(&p);
    }
    assert_eq!(joined, payload, "multiplexer round trip");
}

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    let mut plugin_conn = Decoder::default();
    let mut runtime_conn = Decoder::default();
    let mut consumed = 0usize;
    (|| {
        loop {
            let frame = match ready(read_frame(&mut reader)) {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(_) => break,
            };
            let (conn, payload) = frame;
            consumed += MUX_HEADER_LEN + payload.len();
            check_mux(conn, &payload);
            let decoder = match conn {
                PLUGIN_CONN => &mut plugin_conn,
                RUNTIME_CONN => &mut runtime_conn,
                _ => continue,
            };
            decoder.push(&payload);
            loop {
                let message = match decoder.next_message() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(_) => return,
                };
                assert!(message.payload.len() <= MAX_MESSAGE);
                check_ttrpc(&message);
                if conn == PLUGIN_CONN {
                    if let Some(request) = round_trip::<Request>(&message.payload) {
                        plugin_request(&request);
                    }
                } else if let Some(response) = round_trip::<Response>(&message.payload) {
                    runtime_reply(&response);
                }
            }
        }
    })();
    assert!(consumed <= data.len());
});
