//! What the fuzz targets share: the properties every accepted annotation must have, a
//! structure-aware annotation generator, and small in-memory streams.

pub mod annotation;
pub mod stream;

/// Whether a message is safe to put in a log line or an error returned to the runtime: no
/// control characters (which could forge lines) and bounded.
pub fn assert_loggable(message: &str, max_chars: usize, what: &dyn std::fmt::Debug) {
    assert!(
        !message.chars().any(char::is_control),
        "control character in a message: {message:?} (input {what:?})"
    );
    assert!(
        message.chars().count() <= max_chars,
        "message of {} chars over {max_chars}: {message:?}",
        message.chars().count()
    );
}

/// A single-threaded runtime with a paused clock: timers fire as soon as every task waits, so
/// a hang in the code under test is a libFuzzer timeout, not a slow run.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime")
}

/// Runs a future that never waits (it reads from memory) to completion.
pub fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("an in-memory read waited"),
    }
}
