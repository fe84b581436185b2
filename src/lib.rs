//! nri-identity-injector: the identity engine and the daemon around it.
//!
//! Data path: runtime event ([`nri`], the containerd NRI backend) → [`engine`] → identity
//! source ([`spire`]) → artifact writer ([`artifacts`], through [`host`]) → container.
//!
//! Errors are typed (`thiserror`) and each message is complete: an error that wraps another
//! prints it and does not also return it from `source()`, so a log line or the status the
//! runtime sees ([`nri::status`], the one place errors become wire codes) never repeats a
//! cause nor loses one.

pub mod annotation;
pub mod artifacts;
pub mod config;
pub mod daemon;
pub mod der;
pub mod engine;
pub mod guard;
pub mod host;
pub mod http;
pub mod k8s;
pub mod limits;
pub mod metrics;
pub mod nri;
pub mod selinux;
pub mod spiffe;
pub mod spire;
mod tls;
