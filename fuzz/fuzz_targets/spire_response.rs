//! What the SPIRE agent sends on the Delegated Identity API, as the daemon decodes and uses
//! it: a `SubscribeToX509SVIDs` message (protobuf, then validation: SVIDs without an ID, a
//! chain or a key are dropped) and a `SubscribeToX509Bundles` message (protobuf, then each
//! bundle split into DER certificates), then rendered into the files of every layout.
//!
//! Holds: no panic; every SVID kept has an ID, a non-empty chain of non-empty certificates and
//! a key; every rendered file has a plain name (federated bundle files only for plain trust
//! domain names), only key files are secret, and the PEM in each file decodes to exactly the
//! DER items it was made of, in order.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nri_identity_injector::spire::client_fuzzing::{bundle_message, svid_message};

#[path = "common/x509_files.rs"]
mod x509_files;

fuzz_target!(|data: &[u8]| x509_files::run(data, svid_message, bundle_message));
