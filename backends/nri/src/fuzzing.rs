//! Entry points for the fuzz targets in the repository's `fuzz/` crate (feature `fuzzing`):
//! the multiplexer and ttrpc decoders, the ttrpc envelopes, and one connection served over a
//! stream the caller owns. Not an API: nothing here is stable.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use crate::api::ttrpc::{Request, Response, Status as WireStatus};
pub use crate::mux::{
    HEADER_LEN as MUX_HEADER_LEN, MAX_IN_PAYLOAD, MAX_OUT_PAYLOAD, PLUGIN_CONN, RUNTIME_CONN,
    encode_frames, read_frame,
};
pub use crate::ttrpc::{
    Decoder, HEADER_LEN as TTRPC_HEADER_LEN, Kind, MAX_MESSAGE, Message, encode,
};
use crate::{ConnectionState, Error, Plugin};

/// Serves `plugin` on `stream` as [`crate::Runner`] serves one connection: registers (waiting
/// up to `registration_timeout` for the reply), then answers the runtime until it closes the
/// stream or a protocol error ends the session. Returns whether the registration was accepted.
pub async fn serve<P: Plugin>(
    stream: UnixStream,
    plugin: Arc<P>,
    registration_timeout: Duration,
) -> (Result<(), Error>, bool) {
    let registration = crate::session::Registration {
        name: "fuzz".to_owned(),
        index: "10".to_owned(),
        timeout: registration_timeout,
    };
    let (state, _) = watch::channel(ConnectionState::Connecting { attempt: 0 });
    let mut registered = false;
    let result = crate::session::run(
        stream,
        plugin,
        &registration,
        &state,
        &CancellationToken::new(),
        &mut registered,
    )
    .await;
    (result, registered)
}
