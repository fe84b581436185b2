//! What the SPIRE agent sends for JWT-SVIDs, as the daemon decodes and uses it, on either API:
//! the Delegated Identity API's `FetchJWTSVIDs` answer or the Broker API's `FetchJWTSVID`
//! answer (protobuf, then validation: tokens that are not a compact JWS within the size cap,
//! without a valid ID, or expiring before they were issued are dropped; on the Broker API the
//! times are read from the token's claims, and a token without a numeric `exp` is dropped), and
//! the API's `SubscribeToJWTBundles` message (protobuf, then the JWKS check of each bundle),
//! then rendered into the token file and the JWKS file.
//!
//! Holds: no panic; every token kept is three non-empty base64url parts within
//! `MAX_JWT_BYTES`, expires after it was issued and carries an ID that parses again to
//! itself; every bundle kept is a JSON object with a `keys` array, under a trust domain that
//! parses again to itself; the token file holds exactly the token (one line, no newline) and
//! is secret, the JWKS file exactly the document as sent and is not.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nri_identity_injector::annotation::{self, Policy};
use nri_identity_injector::artifacts::{RenderedFiles, RenderedKind};
use nri_identity_injector::spiffe::{SpiffeId, TrustDomain};
use nri_identity_injector::spire::MAX_JWT_BYTES;
use nri_identity_injector::spire::{broker_fuzzing, client_fuzzing};

/// Layout, as the X.509 targets': which API (the high bit: the Broker API) and which
/// annotation's file names (the rest) (u8), the length of the JWT-SVID answer (u16, big
/// endian), the answer, the bundle message.
struct Input<'a> {
    svids: &'a [u8],
    bundles: &'a [u8],
    files: u8,
}

impl<'a> Input<'a> {
    fn from_bytes(data: &'a [u8]) -> Option<Input<'a>> {
        let (head, rest) = data.split_at_checked(3)?;
        let n = usize::from(u16::from_be_bytes([head[1], head[2]])).min(rest.len());
        let (svids, bundles) = rest.split_at(n);
        Some(Input {
            svids,
            bundles,
            files: head[0],
        })
    }
}

const ANNOTATIONS: &[&str] = &[
    "cert_dir: /c\njwt_audience: [a]",
    "cert_dir: /c\njwt_audience: [a, b]\njwt_svid_file_name: t.jwt\njwt_bundle_file_name: k.json",
    "layout: spiffe\njwt_audience: [a]",
];

fn base64url_part(p: &str) -> bool {
    !p.is_empty()
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.contains('/')
        && !name.contains('\0')
        && name != "."
        && name != ".."
        && !name.starts_with(".tmp-")
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::from_bytes(data) else {
        return;
    };
    let (svids, bundles) = if input.files & 0x80 != 0 {
        // A fixed "now" (2027-01-15) keeps a run deterministic.
        (
            broker_fuzzing::jwt_message(input.svids, 1_800_000_000),
            broker_fuzzing::jwt_bundle_message(input.bundles),
        )
    } else {
        (
            client_fuzzing::jwt_message(input.svids),
            client_fuzzing::jwt_bundle_message(input.bundles),
        )
    };
    if let Ok(svids) = &svids {
        for s in svids {
            assert_eq!(
                SpiffeId::parse(s.spiffe_id.as_str()).as_ref(),
                Ok(&s.spiffe_id)
            );
            assert!(s.token.len() <= MAX_JWT_BYTES);
            let parts: Vec<&str> = s.token.split('.').collect();
            assert!(parts.len() == 3 && parts.iter().all(|p| base64url_part(p)));
            assert!(s.expires_at > s.issued_at);
        }
    }
    if let Ok(set) = &bundles {
        for (td, jwks) in &set.bundles {
            assert_eq!(TrustDomain::parse(&td.id()).as_ref(), Ok(td));
            let doc: serde_json::Value = serde_json::from_slice(jwks).expect("checked JSON");
            assert!(doc.get("keys").is_some_and(serde_json::Value::is_array));
        }
    }
    let (Ok(svids), Ok(set)) = (svids, bundles) else {
        return;
    };
    let policy = Policy::new("/run/spire/admin/admin.sock");
    let text = ANNOTATIONS[usize::from(input.files & 0x7f) % ANNOTATIONS.len()];
    let request = annotation::parse(text, &policy).expect("fixed annotation");
    let jwt = request
        .jwt
        .as_ref()
        .expect("the annotation asks for a JWT-SVID");
    for svid in &svids {
        let jwks = set.bundles.get(svid.spiffe_id.trust_domain());
        let files = RenderedFiles::jwt(
            Some((&jwt.token, svid.token.as_str())),
            jwks.map(|j| (&jwt.bundle, j.as_slice())),
        )
        .expect("validated names render");
        let mut kinds = Vec::new();
        for f in files.files() {
            assert!(plain_name(f.name()), "file name {:?}", f.name());
            match f.kind() {
                RenderedKind::JwtSvid => {
                    assert_eq!(f.name(), jwt.token.name);
                    assert!(f.kind().is_secret());
                    assert_eq!(f.contents(), svid.token.as_bytes());
                    assert!(!f.contents().contains(&b'\n'));
                }
                RenderedKind::JwtBundle => {
                    assert_eq!(f.name(), jwt.bundle.name);
                    assert!(!f.kind().is_secret());
                    assert_eq!(Some(f.contents()), jwks.map(Vec::as_slice));
                }
                other => panic!("a JWT rendering holds only JWT files, not {other:?}"),
            }
            kinds.push(f.kind().clone());
        }
        assert_eq!(kinds.len(), 1 + usize::from(jwks.is_some()));
    }
});
