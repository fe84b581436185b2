#![doc = include_str!("../README.md")]

pub mod api;
mod error;
mod mux;
mod plugin;
mod runner;
mod session;
mod ttrpc;

pub use api::{Event, EventSet};
pub use error::{Code, Error, Status};
pub use nri_plugin_macros::plugin;
pub use plugin::{Context, CreateReply, Delivery, Plugin, RuntimeInfo};
pub use runner::{Backoff, ConnectionState, DEFAULT_SOCKET_PATH, Options, Runner, SocketSource};
pub use session::RuntimeClient;

#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
