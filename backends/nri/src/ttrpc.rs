//! ttrpc message framing: a 10-byte header (length u32 BE excluding the header, stream ID
//! u32 BE, type u8, flags u8) then the protobuf envelope.

use bytes::{Buf, Bytes, BytesMut};

use crate::Error;

pub const HEADER_LEN: usize = 10;
/// ttrpc's own limit on one message.
pub const MAX_MESSAGE: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request = 1,
    Response = 2,
}

#[derive(Debug)]
pub struct Message {
    pub stream_id: u32,
    pub kind: u8,
    pub payload: Bytes,
}

/// Header + payload of one message, ready for the multiplexer.
pub fn encode(stream_id: u32, kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(payload);
    out
}

/// Reassembles messages from one connection's multiplexer payloads.
#[derive(Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Message>, Error> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_MESSAGE {
            return Err(Error::Protocol(format!(
                "ttrpc message of {len} bytes exceeds {MAX_MESSAGE}"
            )));
        }
        if self.buf.len() < HEADER_LEN + len {
            // Reserve once for the whole message rather than growing frame by frame.
            self.buf.reserve(HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        let stream_id = u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]);
        let kind = self.buf[8];
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Message {
            stream_id,
            kind,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trips_through_arbitrary_fragmentation() {
        let a = encode(1, Kind::Request, b"first");
        let b = encode(3, Kind::Response, &vec![9u8; 10_000]);
        let stream: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        for step in [1, 3, 10, 11, 4096, stream.len()] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for piece in stream.chunks(step) {
                d.push(piece);
                while let Some(m) = d.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got.len(), 2, "step {step}");
            assert_eq!(
                (got[0].stream_id, got[0].kind, &got[0].payload[..]),
                (1, 1, &b"first"[..])
            );
            assert_eq!(
                (got[1].stream_id, got[1].kind, got[1].payload.len()),
                (3, 2, 10_000)
            );
        }
    }

    #[test]
    fn header_is_big_endian_with_type_and_zero_flags() {
        let m = encode(0x0102_0304, Kind::Response, b"xy");
        assert_eq!(&m[..10], &[0, 0, 0, 2, 1, 2, 3, 4, 2, 0]);
    }

    #[test]
    fn oversize_message_is_refused_before_buffering_it() {
        let mut d = Decoder::default();
        d.push(&((MAX_MESSAGE as u32) + 1).to_be_bytes());
        d.push(&[0, 0, 0, 1, 1, 0]);
        assert!(matches!(d.next_message(), Err(Error::Protocol(_))));
    }

    #[test]
    fn empty_payload_message_is_complete() {
        let mut d = Decoder::default();
        d.push(&encode(5, Kind::Request, b""));
        let m = d.next_message().unwrap().unwrap();
        assert_eq!((m.stream_id, m.payload.len()), (5, 0));
        assert!(d.next_message().unwrap().is_none());
    }
}
