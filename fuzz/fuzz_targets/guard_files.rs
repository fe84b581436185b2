//! The start guard's reading of the identity files (`guard::check` once the files are
//! present): the first CERTIFICATE and PRIVATE KEY PEM blocks, their base64, the leaf's DER
//! (public key, URI SANs) and the PKCS#8 key compared with it. The guard runs inside the
//! container on every start, as the container's user, on files in a directory the workload
//! can see.
//!
//! Holds: no panic, whatever the files hold; an accepted pair carries the expected SPIFFE ID
//! and a key that does not differ from the leaf's; a DER error names an offset inside the
//! value read.
//!
//! Layout (so that real files are seeds): a flags byte (bit 0: the combined layout, key and
//! certificate in one file; bit 1: a SPIFFE ID is expected; bit 2: the contents are DER, which
//! the target wraps into PEM blocks itself so that mutations reach the DER walker directly),
//! a big-endian u16 length and the certificate file, then (separate layout) a u16 length and
//! the key file, then the expected SPIFFE ID (the rest, as UTF-8).

#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use nri_identity_injector::der::DerError;
use nri_identity_injector::guard::fuzzing::judge;
use nri_identity_injector::guard::{KeyMatch, NotReady};

fn take<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (value, rest) = rest.split_at(len);
    *data = rest;
    Some(value)
}

fn pem(label: &str, der: &[u8]) -> Vec<u8> {
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        STANDARD.encode(der)
    )
    .into_bytes()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let (combined, with_id, der) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
    let Some(cert) = take(&mut rest) else {
        return;
    };
    let key = if combined {
        None
    } else {
        let Some(key) = take(&mut rest) else {
            return;
        };
        Some(key)
    };
    let spiffe_id = with_id.then(|| String::from_utf8_lossy(rest).into_owned());
    let (cert_der, key_der) = (cert, key.unwrap_or(cert));
    let (cert, key) = if der {
        let cert_pem = pem("CERTIFICATE", cert);
        let key_pem = pem("PRIVATE KEY", key_der);
        if combined {
            ([cert_pem, key_pem].concat(), None)
        } else {
            (cert_pem, Some(key_pem))
        }
    } else {
        (cert.to_vec(), key.map(<[u8]>::to_vec))
    };
    match judge(&cert, key.as_deref(), spiffe_id.as_deref()) {
        Ok(accepted) => {
            assert_ne!(accepted.key, KeyMatch::Differs, "accepted a mismatched key");
            if let Some(id) = &spiffe_id {
                assert!(accepted.uris.contains(id), "accepted without {id:?}");
            }
        }
        Err(NotReady::BadDer { what, error, .. }) if der => {
            let value = if what == "the leaf certificate" {
                cert_der
            } else {
                key_der
            };
            assert!(
                offset(&error) <= value.len(),
                "{error} in a value of {} bytes",
                value.len()
            );
        }
        Err(_) => {}
    }
});

fn offset(e: &DerError) -> usize {
    match *e {
        DerError::NotASequence { offset, .. }
        | DerError::UnexpectedTag { offset, .. }
        | DerError::MissingElement { offset, .. }
        | DerError::HighTagNumber { offset }
        | DerError::TruncatedHeader { offset }
        | DerError::Truncated { offset, .. }
        | DerError::BadLengthForm { offset }
        | DerError::NonMinimalLength { offset }
        | DerError::LengthTooLarge { offset, .. }
        | DerError::BadTime { offset } => offset,
    }
}
