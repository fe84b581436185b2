//! What a SPIFFE Broker API endpoint sends (`identity_api = "broker"`), as the daemon decodes
//! and uses it: a `SubscribeToX509SVID` message (protobuf, then validation: SVIDs with an
//! invalid ID, a chain that is not DER, no key, or a leaf whose NotAfter cannot be read are
//! dropped) and a `SubscribeToX509Bundles` message (protobuf, then each bundle split into DER
//! certificates), then rendered into the files of every layout.
//!
//! Holds what `spire_response` holds for the Delegated Identity API: no panic; every SVID kept
//! has an ID, a non-empty chain of non-empty certificates and a key; every rendered file has
//! a plain name, only key files are secret, and each file's PEM decodes to exactly its DER
//! items, in order.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nri_identity_injector::spire::broker_fuzzing::{bundle_message, svid_message};

#[path = "common/x509_files.rs"]
mod x509_files;

fuzz_target!(|data: &[u8]| x509_files::run(data, svid_message, bundle_message));
