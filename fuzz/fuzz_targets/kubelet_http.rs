//! The kubelet's answer to `GET /pods` as the daemon's HTTP/1.1 client reads it: status line,
//! headers, and a body framed by Content-Length, chunked encoding or the end of the
//! connection, delivered in pieces of any size, with the peer closing cleanly or cutting
//! the connection.
//!
//! Holds: no panic; never a body over the limit; and for a well-formed response (the
//! structured half of the input), exactly its status and body, or a refusal when the body is
//! over the limit or the connection was cut before an unframed body ended. The chunked
//! decoder returns exactly what was chunked, whatever the chunk sizes and extensions.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nri_identity_injector::k8s::kubelet_fuzzing::{dechunk, http_get};
use nri_identity_injector_fuzz::ready;
use nri_identity_injector_fuzz::stream::Replay;

#[derive(Arbitrary, Debug)]
enum Framing {
    ContentLength,
    /// Chunk sizes (cycled), with an extension on every chunk when set.
    Chunked(Vec<u8>, bool),
    Close,
}

#[derive(Arbitrary, Debug)]
struct Model {
    /// Any number; rendered as a three-digit code (`code`), the only kind a status line has.
    status: u16,
    reason: bool,
    extra_headers: Vec<u8>,
    framing: Framing,
    body: Vec<u8>,
    header_case: bool,
}

/// The model's status as the three-digit code it is rendered with.
fn code(m: &Model) -> u16 {
    100 + m.status % 900
}

#[derive(Debug)]
enum Body {
    Raw(Vec<u8>),
    Model(Model),
}

/// Layout (so that real responses are seeds): flags (bit 0: the peer cuts the connection;
/// bit 1: the rest is a structured response), the body limit (u16, big endian), the read
/// size (0: all at once), then the response bytes.
#[derive(Debug)]
struct Input {
    body: Body,
    pieces: Vec<u8>,
    cut: bool,
    limit: u16,
}

impl Input {
    fn from_bytes(data: &[u8]) -> Option<Input> {
        let (head, rest) = data.split_at_checked(4)?;
        let body = if head[0] & 2 != 0 {
            Body::Model(Model::arbitrary_take_rest(arbitrary::Unstructured::new(rest)).ok()?)
        } else {
            Body::Raw(rest.to_vec())
        };
        Some(Input {
            body,
            pieces: if head[3] == 0 {
                Vec::new()
            } else {
                vec![head[3]]
            },
            cut: head[0] & 1 != 0,
            limit: u16::from_be_bytes([head[1], head[2]]),
        })
    }
}

const EXTRA: &[&str] = &[
    "Content-Type: application/json",
    "Date: Mon, 01 Jan 2024 00:00:00 GMT",
    "X-Empty:",
    "Connection: close",
    "Audit-Id: 2c1d0c4c",
    "Vary: Accept-Encoding",
];

fn chunked(body: &[u8], sizes: &[u8], ext: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    let mut i = 0;
    while !rest.is_empty() {
        let size = sizes
            .get(i % sizes.len().max(1))
            .copied()
            .unwrap_or(16)
            .max(1) as usize;
        let n = size.min(rest.len());
        out.extend_from_slice(format!("{n:x}").as_bytes());
        if ext {
            out.extend_from_slice(b";name=value");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
        i += 1;
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn render(m: &Model) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {}", code(m)).into_bytes();
    if m.reason {
        out.extend_from_slice(b" OK");
    }
    out.extend_from_slice(b"\r\n");
    for i in &m.extra_headers {
        out.extend_from_slice(EXTRA[usize::from(*i) % EXTRA.len()].as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let body = match &m.framing {
        Framing::ContentLength => {
            let name = if m.header_case {
                "content-length"
            } else {
                "Content-Length"
            };
            out.extend_from_slice(format!("{name}: {}\r\n", m.body.len()).as_bytes());
            m.body.clone()
        }
        Framing::Chunked(sizes, ext) => {
            let name = if m.header_case {
                "transfer-encoding"
            } else {
                "Transfer-Encoding"
            };
            out.extend_from_slice(format!("{name}: chunked\r\n").as_bytes());
            chunked(&m.body, sizes, *ext)
        }
        Framing::Close => m.body.clone(),
    };
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::from_bytes(data) else {
        return;
    };
    let limit = usize::from(input.limit);
    let bytes = match &input.body {
        Body::Raw(b) => b.clone(),
        Body::Model(m) => render(m),
    };
    let pieces = input.pieces.iter().map(|p| usize::from(*p)).collect();
    let stream = Replay::new(bytes, pieces, input.cut);
    let result = ready(http_get(stream, limit));
    if let Ok((_, body)) = &result {
        assert!(
            body.len() <= limit,
            "body of {} over the limit {limit}",
            body.len()
        );
    }
    if let Body::Model(m) = &input.body {
        let over = m.body.len() > limit;
        let unframed_cut = matches!(m.framing, Framing::Close) && input.cut;
        match &result {
            Ok((status, body)) => {
                assert!(!over && !unframed_cut, "accepted {m:?}");
                assert_eq!(*status, Some(code(m)), "status of {m:?}");
                assert_eq!(body, &m.body, "body of {m:?}");
            }
            Err(e) => assert!(over || unframed_cut, "refused {m:?}: {e}"),
        }
        if let Framing::Chunked(sizes, ext) = &m.framing {
            let encoded = chunked(&m.body, sizes, *ext);
            assert_eq!(dechunk(&encoded, usize::MAX).as_deref(), Some(&m.body[..]));
            assert_eq!(dechunk(&encoded, limit).is_some(), !over);
        }
    } else if let Body::Raw(raw) = &input.body {
        if let Some(out) = dechunk(raw, limit) {
            assert!(out.len() <= limit);
        }
    }
});
