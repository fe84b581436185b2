//! An in-memory peer: what it "sends" is the fuzz input, delivered in pieces of the sizes the
//! input chose (so partial reads are exercised); what is written to it is discarded.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Replay {
    data: Vec<u8>,
    pos: usize,
    pieces: Vec<usize>,
    next_piece: usize,
    /// The peer stops without a clean close: reads fail with UnexpectedEof once the data ends.
    pub cut: bool,
}

impl Replay {
    /// `pieces` are read sizes, used in turn (1 when empty or zero).
    pub fn new(data: Vec<u8>, pieces: Vec<usize>, cut: bool) -> Self {
        Replay {
            data,
            pos: 0,
            pieces,
            next_piece: 0,
            cut,
        }
    }
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let rest = self.data.len() - self.pos;
        if rest == 0 {
            if self.cut {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            return Poll::Ready(Ok(()));
        }
        let piece = if self.pieces.is_empty() {
            rest
        } else {
            let p = self.pieces[self.next_piece % self.pieces.len()].max(1);
            self.next_piece += 1;
            p
        };
        let n = piece.min(rest).min(buf.remaining());
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
