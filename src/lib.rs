//! nri-identity-injector: the identity engine and the daemon around it.
//!
//! Data path: runtime event (NRI backend) → [`engine`] → identity source (SPIRE) →
//! artifact writer → container.

pub mod annotation;
pub mod config;
pub mod metrics;
