//! What every X.509 identity source's messages must turn into, shared by the targets of
//! the Delegated Identity API (`spire_response`) and the Broker API (`broker_response`): the
//! input layout, the checks of a converted message, and the files of every layout rendered
//! from it.

use std::collections::BTreeMap;

use nri_identity_injector::annotation::{self, Policy};
use nri_identity_injector::artifacts::{Material, RenderedFiles, RenderedKind};
use nri_identity_injector::spiffe::{SpiffeId, TrustDomain};
use nri_identity_injector::spire::{BundleSet, SvidUpdate};
use rustls_pki_types::pem::{PemObject, SectionKind};

/// Layout (so that real messages are seeds): which annotation's files to render (u8), the
/// length of the SVID message (u16, big endian), the SVID message, the bundle message.
pub struct Input<'a> {
    pub svids: &'a [u8],
    pub bundles: &'a [u8],
    pub files: u8,
}

impl<'a> Input<'a> {
    pub fn from_bytes(data: &'a [u8]) -> Option<Input<'a>> {
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
    "cert_dir: /c",
    "cert_dir: /c\nfederated_bundles: append",
    "cert_dir: /c\nlayout: combined",
    "cert_dir: /c\nlayout: combined\nfederated_bundles: append",
    "layout: spiffe",
];

fn pem_items(pem: &[u8]) -> Vec<(SectionKind, Vec<u8>)> {
    <(SectionKind, Vec<u8>)>::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .expect("our PEM parses")
}

/// One input through a source's two decoders (SVID message, bundle message), then the checks
/// every source's answers must pass.
pub fn run(
    data: &[u8],
    svid_message: fn(&[u8]) -> Result<SvidUpdate, String>,
    bundle_message: fn(&[u8]) -> Result<BundleSet, String>,
) {
    let Some(input) = Input::from_bytes(data) else {
        return;
    };
    let update = svid_message(input.svids);
    let bundles = bundle_message(input.bundles);
    check_converted(update.as_ref().ok(), bundles.as_ref().ok());
    if let (Ok(update), Ok(set)) = (update, bundles) {
        check_rendered(&update, &set, input.files);
    }
}

/// Every SVID kept has a parsed ID that parses again to itself, a chain of non-empty
/// certificates and a key; every trust domain named parses again to itself; every bundle
/// certificate starts as a DER SEQUENCE.
pub fn check_converted(update: Option<&SvidUpdate>, bundles: Option<&BundleSet>) {
    if let Some(update) = update {
        for s in &update.svids {
            assert_eq!(
                SpiffeId::parse(s.spiffe_id.as_str()).as_ref(),
                Ok(&s.spiffe_id)
            );
            assert!(!s.cert_chain.is_empty() && s.cert_chain.iter().all(|c| !c.is_empty()));
            assert!(!s.private_key.is_empty());
        }
        for td in &update.federates_with {
            assert_eq!(TrustDomain::parse(&td.id()).as_ref(), Ok(td));
        }
    }
    if let Some(set) = bundles {
        for (td, certs) in &set.bundles {
            assert_eq!(TrustDomain::parse(&td.id()).as_ref(), Ok(td));
            assert!(certs.iter().all(|c| c.first() == Some(&0x30)));
        }
    }
}

/// Renders each SVID's files in the layout `files` picks and checks names, secrecy and that
/// each file's PEM decodes to exactly the DER items it was made of, in order.
pub fn check_rendered(update: &SvidUpdate, set: &BundleSet, files: u8) {
    let policy = Policy::new("/run/spire/admin/admin.sock");
    let text = ANNOTATIONS[usize::from(files) % ANNOTATIONS.len()];
    let request = annotation::parse(text, &policy).expect("fixed annotation");
    for svid in &update.svids {
        let own = svid.spiffe_id.trust_domain();
        let Some(own_bundle) = set.bundles.get(own) else {
            continue;
        };
        let federated: BTreeMap<TrustDomain, Vec<Vec<u8>>> = update
            .federates_with
            .iter()
            .filter(|td| *td != own)
            .filter_map(|td| Some((td.clone(), set.bundles.get(td)?.clone())))
            .collect();
        let material = Material {
            trust_domain: own.clone(),
            chain: svid.cert_chain.clone(),
            key: svid.private_key.clone(),
            own_bundle: own_bundle.clone(),
            federated,
        };
        let Ok(files) = RenderedFiles::for_request(&request, &material) else {
            continue;
        };
        for f in files.files() {
            let name = f.name();
            assert!(
                !name.is_empty()
                    && name.len() <= 255
                    && !name.contains('/')
                    && !name.contains('\0'),
                "file name {name:?}"
            );
            assert!(
                name != "." && name != ".." && !name.starts_with(".tmp-"),
                "file name {name:?}"
            );
            assert_eq!(
                f.kind().is_secret(),
                matches!(
                    f.kind(),
                    RenderedKind::PrivateKey | RenderedKind::KeyAndChain
                )
            );
            let items = pem_items(f.contents());
            let certs = |ders: &[Vec<u8>]| -> Vec<(SectionKind, Vec<u8>)> {
                ders.iter()
                    .map(|d| (SectionKind::Certificate, d.clone()))
                    .collect()
            };
            let expected = match f.kind() {
                RenderedKind::PrivateKey => {
                    vec![(SectionKind::PrivateKey, material.key.to_vec())]
                }
                RenderedKind::KeyAndChain => {
                    let mut v = vec![(SectionKind::PrivateKey, material.key.to_vec())];
                    v.extend(certs(&material.chain));
                    v
                }
                RenderedKind::SvidChain => certs(&material.chain),
                RenderedKind::TrustBundle => {
                    let mut v = certs(&material.own_bundle);
                    if files.federated_bundles()
                        == nri_identity_injector::annotation::FederatedBundles::Append
                    {
                        for c in material.federated.values() {
                            v.extend(certs(c));
                        }
                    }
                    v
                }
                RenderedKind::FederatedBundle { trust_domain } => {
                    assert_eq!(name, format!("{trust_domain}.x509.pem"));
                    assert!(trust_domain.name().bytes().all(|b| matches!(b,
                        b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')));
                    certs(&material.federated[trust_domain])
                }
                RenderedKind::JwtSvid | RenderedKind::JwtBundle => {
                    unreachable!("the X.509 files never include a JWT file: {name}")
                }
            };
            assert_eq!(items, expected, "PEM round trip of {name}");
        }
    }
}
