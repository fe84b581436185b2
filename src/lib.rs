//! nri-identity-injector: the identity engine and the daemon around it.
//!
//! Data path: runtime event ([`nri`], the containerd NRI backend) → [`engine`] → identity
//! source ([`spire`]) → artifact writer ([`artifacts`], through [`host`]) → container.

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
pub mod spire;
