//! The NRI connection multiplexer: several logical connections over one socket.
//!
//! Frame = conn ID (u32 BE, 0 reserved) · payload length (u32 BE) · payload. Connection 1
//! carries the Plugin service (the runtime calls us), connection 2 the Runtime service (we
//! call the runtime).
//!
//! Outgoing payloads are cut into frames of at most [`MAX_OUT_PAYLOAD`] bytes: the Go
//! multiplexer hands one whole frame to each `Read` and Go ttrpc reads through a 4096-byte
//! buffer, so a larger frame fails there with ENOMEM and the runtime drops the plugin.
//! Incoming frames may be of any size up to [`MAX_IN_PAYLOAD`]; a frame is not a message, so
//! callers reassemble each connection's payloads into a byte stream.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::Error;

pub const PLUGIN_CONN: u32 = 1;
pub const RUNTIME_CONN: u32 = 2;
pub const HEADER_LEN: usize = 8;
/// Largest payload we put in one frame.
pub const MAX_OUT_PAYLOAD: usize = 4096;
/// Largest payload we accept in one frame: a 10-byte ttrpc header plus a 4 MiB message, the
/// most the Go multiplexer ever writes at once.
pub const MAX_IN_PAYLOAD: usize = 10 + (4 << 20);

/// Appends `data` to `out` as frames of at most [`MAX_OUT_PAYLOAD`] bytes for `conn`.
/// Writes nothing for empty data: a zero-length frame reads as "no progress" in Go.
pub fn encode_frames(conn: u32, data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len() + HEADER_LEN * data.len().div_ceil(MAX_OUT_PAYLOAD));
    for chunk in data.chunks(MAX_OUT_PAYLOAD) {
        out.extend_from_slice(&conn.to_be_bytes());
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        out.extend_from_slice(chunk);
    }
}

/// Reads one frame; `None` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<(u32, Bytes)>, Error> {
    let mut header = [0u8; HEADER_LEN];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let conn = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > MAX_IN_PAYLOAD {
        return Err(Error::Protocol(format!(
            "multiplexer frame of {len} bytes on connection {conn} exceeds {MAX_IN_PAYLOAD}"
        )));
    }
    let mut payload = BytesMut::zeroed(len);
    reader.read_exact(&mut payload).await?;
    Ok(Some((conn, payload.freeze())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(buf: &[u8]) -> Vec<(u32, usize)> {
        let mut out = Vec::new();
        let mut rest = buf;
        while !rest.is_empty() {
            let conn = u32::from_be_bytes(rest[0..4].try_into().unwrap());
            let len = u32::from_be_bytes(rest[4..8].try_into().unwrap()) as usize;
            out.push((conn, len));
            rest = &rest[8 + len..];
        }
        out
    }

    #[test]
    fn outgoing_payloads_are_cut_at_4096_bytes() {
        let mut out = Vec::new();
        encode_frames(1, &vec![7u8; 10_000], &mut out);
        assert_eq!(frames(&out), vec![(1, 4096), (1, 4096), (1, 1808)]);
        assert_eq!(out.len(), 10_000 + 3 * HEADER_LEN);
    }

    #[test]
    fn exactly_4096_bytes_is_one_frame_and_4097_two() {
        let mut out = Vec::new();
        encode_frames(2, &[0u8; 4096], &mut out);
        assert_eq!(frames(&out), vec![(2, 4096)]);
        out.clear();
        encode_frames(2, &[0u8; 4097], &mut out);
        assert_eq!(frames(&out), vec![(2, 4096), (2, 1)]);
    }

    #[test]
    fn empty_data_writes_no_zero_length_frame() {
        let mut out = Vec::new();
        encode_frames(1, &[], &mut out);
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn reads_frames_and_reports_clean_eof() {
        let mut out = Vec::new();
        encode_frames(1, b"hello", &mut out);
        encode_frames(2, b"world!", &mut out);
        let mut reader = &out[..];
        let (c, p) = read_frame(&mut reader).await.unwrap().unwrap();
        assert_eq!((c, &p[..]), (1, &b"hello"[..]));
        let (c, p) = read_frame(&mut reader).await.unwrap().unwrap();
        assert_eq!((c, &p[..]), (2, &b"world!"[..]));
        assert!(read_frame(&mut reader).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversize_frame_is_a_protocol_error_not_an_allocation() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&1u32.to_be_bytes());
        buf.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut reader = &buf[..];
        let err = read_frame(&mut reader).await.unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{err}");
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&1u32.to_be_bytes());
        buf.extend_from_slice(&100u32.to_be_bytes());
        buf.extend_from_slice(&[0u8; 10]);
        let mut reader = &buf[..];
        assert!(matches!(read_frame(&mut reader).await, Err(Error::Io(_))));
    }
}
