//! Connecting, registering and reconnecting.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::session::{self, Registration};
use crate::{Error, Plugin, RuntimeInfo};

/// The runtime's default NRI socket.
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/nri/nri.sock";

/// Where the connection to the runtime comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketSource {
    /// Dial this socket, and dial again whenever the runtime goes away.
    Path(PathBuf),
    /// The runtime launched us with the connection already open on this descriptor
    /// (`NRI_PLUGIN_SOCKET`). When it closes, the plugin is done: the runtime relaunches it.
    PreConnected(i32),
}

/// How long to wait between reconnection attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// Delay before attempt `n` (0-based): exponential, capped, with "equal jitter" (half fixed,
    /// half random) so a fleet of plugins does not reconnect in lockstep after a restart.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
        let capped = exp.min(self.max);
        let half = capped / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Options of a plugin connection.
#[derive(Debug, Clone)]
pub struct Options {
    /// Plugin name, `[A-Za-z0-9_.+-]+`.
    pub name: String,
    /// Two digits; plugins are called in ascending index order.
    pub index: String,
    pub socket: SocketSource,
    pub backoff: Backoff,
    /// How long to wait for the runtime to answer RegisterPlugin.
    pub registration_timeout: Duration,
}

impl Options {
    /// Options for a plugin that dials `DEFAULT_SOCKET_PATH`.
    pub fn new(name: impl Into<String>, index: impl Into<String>) -> Self {
        Options {
            name: name.into(),
            index: index.into(),
            socket: SocketSource::Path(PathBuf::from(DEFAULT_SOCKET_PATH)),
            backoff: Backoff::default(),
            registration_timeout: Duration::from_secs(10),
        }
    }

    pub fn socket_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = SocketSource::Path(path.into());
        self
    }

    /// Applies what a runtime that launched the plugin put in the environment
    /// (`NRI_PLUGIN_SOCKET`, `NRI_PLUGIN_NAME`, `NRI_PLUGIN_IDX`). They win over everything
    /// else: a launched plugin is registered under its file name whatever it asks for.
    pub fn from_env(self) -> Result<Self, Error> {
        self.apply_env(|k| std::env::var(k).ok())
    }

    /// [`Options::from_env`] over any source of variables.
    pub fn apply_env(mut self, var: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        if let Some(value) = var("NRI_PLUGIN_SOCKET").filter(|v| !v.is_empty()) {
            let fd = value
                .parse::<i32>()
                .ok()
                .filter(|fd| *fd > 2)
                .ok_or_else(|| Error::PreConnected {
                    value: value.clone(),
                    reason: "not a file descriptor number above 2".into(),
                })?;
            self.socket = SocketSource::PreConnected(fd);
        }
        if let Some(name) = var("NRI_PLUGIN_NAME").filter(|v| !v.is_empty()) {
            self.name = name;
        }
        if let Some(index) = var("NRI_PLUGIN_IDX").filter(|v| !v.is_empty()) {
            self.index = index;
        }
        Ok(self)
    }

    fn validate(&self) -> Result<(), Error> {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.+-".contains(c));
        if !name_ok {
            return Err(Error::InvalidName(self.name.clone()));
        }
        if self.index.len() != 2 || !self.index.chars().all(|c| c.is_ascii_digit()) {
            return Err(Error::InvalidIndex(self.index.clone()));
        }
        Ok(())
    }
}

/// Where the plugin stands with the runtime; watch it for readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Trying to reach the runtime.
    Connecting { attempt: u32 },
    /// The runtime accepted the registration; synchronization is under way.
    Registered,
    /// Synchronized: the runtime sends this plugin its events.
    Ready(Arc<RuntimeInfo>),
    /// The connection ended; a new attempt follows unless the plugin is stopping.
    Disconnected { reason: String },
    /// `run` returned.
    Stopped,
}

impl ConnectionState {
    pub fn is_ready(&self) -> bool {
        matches!(self, ConnectionState::Ready(_))
    }
}

/// Drives a [`Plugin`]: connects, registers, serves, and reconnects with backoff.
pub struct Runner<P> {
    plugin: Arc<P>,
    options: Options,
    state: watch::Sender<ConnectionState>,
}

impl<P: Plugin> Runner<P> {
    pub fn new(plugin: Arc<P>, options: Options) -> Result<Self, Error> {
        options.validate()?;
        let (state, _) = watch::channel(ConnectionState::Connecting { attempt: 0 });
        Ok(Runner {
            plugin,
            options,
            state,
        })
    }

    /// The connection state, updated as it changes.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }

    /// Serves until `shutdown` is cancelled (returns `Ok`), or, for a pre-connected plugin,
    /// until the runtime closes the connection.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let span =
            info_span!("nri", plugin = %format!("{}-{}", self.options.index, self.options.name));
        let result = self.serve(&shutdown).instrument(span).await;
        self.state.send_replace(ConnectionState::Stopped);
        result
    }

    async fn serve(&self, shutdown: &CancellationToken) -> Result<(), Error> {
        let registration = Registration {
            name: self.options.name.clone(),
            index: self.options.index.clone(),
            timeout: self.options.registration_timeout,
        };
        let mut attempt: u32 = 0;
        let mut preconnected = match self.options.socket {
            SocketSource::PreConnected(fd) => Some(take_inherited_socket(fd)?),
            SocketSource::Path(_) => None,
        };
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            self.state
                .send_replace(ConnectionState::Connecting { attempt });
            let stream = match (&self.options.socket, preconnected.take()) {
                (_, Some(stream)) => Ok(stream),
                (SocketSource::PreConnected(_), None) => return Ok(()),
                (SocketSource::Path(path), None) => {
                    UnixStream::connect(path)
                        .await
                        .map_err(|error| Error::Connect {
                            path: path.clone(),
                            error,
                        })
                }
            };
            let mut registered = false;
            let outcome = match stream {
                Ok(stream) => {
                    session::run(
                        stream,
                        self.plugin.clone(),
                        &registration,
                        &self.state,
                        shutdown,
                        &mut registered,
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let reason = match &outcome {
                Ok(()) => "the runtime closed the connection".to_owned(),
                Err(e) => e.to_string(),
            };
            if registered {
                info!(%reason, "disconnected from the runtime");
                attempt = 0;
            } else if attempt == 0 || attempt.is_multiple_of(50) {
                warn!(%reason, attempt, "cannot register with the runtime; retrying");
            }
            self.state
                .send_replace(ConnectionState::Disconnected { reason });
            if matches!(self.options.socket, SocketSource::PreConnected(_)) {
                return outcome;
            }
            let delay = self.options.backoff.delay(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

/// Takes ownership of the socket the runtime left open on `fd` for us.
///
/// This is the crate's only `unsafe`: claiming a descriptor by number cannot be expressed
/// safely. It is sound because (1) the runtime's environment says it handed us exactly this
/// descriptor for this purpose, (2) we check it is open and a socket before claiming it, and
/// (3) a process-wide flag makes sure it is claimed at most once.
#[allow(unsafe_code)]
fn take_inherited_socket(fd: i32) -> Result<UnixStream, Error> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileTypeExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    static TAKEN: AtomicBool = AtomicBool::new(false);

    let err = |reason: &str| Error::PreConnected {
        value: fd.to_string(),
        reason: reason.to_owned(),
    };
    let meta = std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .map_err(|_| err("descriptor is not open"))?;
    if !meta.file_type().is_socket() {
        return Err(err("descriptor is not a socket"));
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(err("descriptor was already taken"));
    }
    // SAFETY: see the function's documentation; the descriptor is open, is a socket, is ours
    // by the runtime's hand-over, and no other owner exists (TAKEN).
    let std_stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    std_stream.set_nonblocking(true)?;
    Ok(UnixStream::from_std(std_stream)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for attempt in 0..40 {
            let d = b.delay(attempt);
            let full = Duration::from_millis(100) * 2u32.pow(attempt.min(5));
            let cap = full.min(Duration::from_secs(2));
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
        }
    }

    #[test]
    fn runtime_environment_wins_for_launched_plugins() {
        let env = |k: &str| match k {
            "NRI_PLUGIN_SOCKET" => Some("3".to_owned()),
            "NRI_PLUGIN_NAME" => Some("identity".to_owned()),
            "NRI_PLUGIN_IDX" => Some("10".to_owned()),
            _ => None,
        };
        let o = Options::new("x", "99").apply_env(env).unwrap();
        assert_eq!((o.name.as_str(), o.index.as_str()), ("identity", "10"));
        assert_eq!(o.socket, SocketSource::PreConnected(3));
    }

    #[test]
    fn bad_preconnected_value_is_refused() {
        for bad in ["x", "-1", "1", "2"] {
            let r = Options::new("x", "10")
                .apply_env(|k| (k == "NRI_PLUGIN_SOCKET").then(|| bad.to_owned()));
            assert!(matches!(r, Err(Error::PreConnected { .. })), "{bad}");
        }
    }

    #[test]
    fn names_and_indices_are_validated_like_the_runtime_does() {
        assert!(Options::new("identity", "10").validate().is_ok());
        assert!(Options::new("a.b+c_d-e", "00").validate().is_ok());
        assert!(matches!(
            Options::new("bad name", "10").validate(),
            Err(Error::InvalidName(_))
        ));
        assert!(matches!(
            Options::new("", "10").validate(),
            Err(Error::InvalidName(_))
        ));
        for idx in ["1", "100", "ab", ""] {
            assert!(
                matches!(
                    Options::new("x", idx).validate(),
                    Err(Error::InvalidIndex(_))
                ),
                "{idx}"
            );
        }
    }
}
