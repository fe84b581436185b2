//! The annotation value as anyone who can create a pod writes it: arbitrary text through the
//! size check, the YAML budget scan, the strict deserializer and validation.
//!
//! Holds: no panic; an accepted value has every property the module promises (socket in the
//! allowlist, normalised cert_dir outside /proc, /sys and /dev, plain distinct file names,
//! safe modes, a key written first); a refusal is a message safe to log; the same value
//! parses the same way twice.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nri_identity_injector::annotation;
use nri_identity_injector_fuzz::annotation::{check_error, check_request, policy};

fuzz_target!(|data: &[u8]| {
    // Kubernetes annotation values are UTF-8 strings; lossy keeps every input useful.
    let value = String::from_utf8_lossy(data);
    let policy = policy();
    let first = annotation::parse(&value, &policy);
    match &first {
        Ok(request) => check_request(request, &policy, &value),
        Err(error) => check_error(error, &value),
    }
    assert_eq!(
        first,
        annotation::parse(&value, &policy),
        "not deterministic"
    );
});
