//! What the start guard learns from a certificate and a private key by reading their DER
//! structure: the leaf's public key and URI SANs, and whether a PKCS#8 key is the one that
//! public key belongs to. No signature is checked and no arithmetic done: a key either
//! carries its public half (EC keys as SPIRE and most libraries write them, PKCS#8 v2 keys)
//! or is an RSA key, whose modulus and exponent are the public key.

use crate::der::{
    BIT_STRING, DerError, INTEGER, OBJECT_IDENTIFIER, OCTET_STRING, Reader, SEQUENCE,
};

/// `id-ecPublicKey` (1.2.840.10045.2.1), contents of the OID.
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// `rsaEncryption` (1.2.840.113549.1.1.1).
const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// `id-ce-subjectAltName` (2.5.29.17).
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// Context-specific tags: `[n]` constructed (EXPLICIT or structured) and primitive.
const fn explicit(n: u8) -> u8 {
    0xa0 | n
}
const fn implicit_primitive(n: u8) -> u8 {
    0x80 | n
}
/// `uniformResourceIdentifier [6] IA5String` in GeneralName.
const URI_NAME: u8 = implicit_primitive(6);
const BOOLEAN: u8 = 0x01;

/// The parts of a leaf certificate the guard checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf<'a> {
    /// The public key's algorithm OID (contents).
    algorithm: &'a [u8],
    /// The `subjectPublicKey` BIT STRING contents (unused-bits octet first).
    public_key: &'a [u8],
    /// URI subject alternative names.
    pub uris: Vec<&'a [u8]>,
}

/// Reads a DER X.509 certificate.
pub fn leaf(der: &[u8]) -> Result<Leaf<'_>, DerError> {
    let certificate = Reader::new(der).expect(SEQUENCE)?;
    let mut tbs = certificate.reader().expect(SEQUENCE)?.reader();
    tbs.optional(explicit(0))?; // version
    tbs.expect(INTEGER)?; // serialNumber
    tbs.expect(SEQUENCE)?; // signature
    tbs.expect(SEQUENCE)?; // issuer
    tbs.expect(SEQUENCE)?; // validity
    tbs.expect(SEQUENCE)?; // subject
    let mut spki = tbs.expect(SEQUENCE)?.reader();
    let algorithm = spki
        .expect(SEQUENCE)?
        .reader()
        .expect(OBJECT_IDENTIFIER)?
        .contents;
    let public_key = spki.expect(BIT_STRING)?.contents;
    tbs.optional(implicit_primitive(1))?; // issuerUniqueID
    tbs.optional(implicit_primitive(2))?; // subjectUniqueID
    let mut uris = Vec::new();
    if let Some(extensions) = tbs.optional(explicit(3))? {
        let mut list = extensions.reader().expect(SEQUENCE)?.reader();
        while !list.is_empty() {
            let mut extension = list.expect(SEQUENCE)?.reader();
            let id = extension.expect(OBJECT_IDENTIFIER)?.contents;
            extension.optional(BOOLEAN)?; // critical
            let value = extension.expect(OCTET_STRING)?;
            if id != SUBJECT_ALT_NAME {
                continue;
            }
            let mut names = value.reader().expect(SEQUENCE)?.reader();
            while let Some(name) = names.next_element()? {
                if name.tag == URI_NAME {
                    uris.push(name.contents);
                }
            }
        }
    }
    Ok(Leaf {
        algorithm,
        public_key,
        uris,
    })
}

/// Whether a private key belongs to a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMatch {
    Matches,
    Differs,
    /// The key carries no public half and is not RSA: telling would take the key's
    /// arithmetic.
    Unknown,
}

/// Compares a PKCS#8 private key with the certificate's public key.
pub fn key_matches(pkcs8: &[u8], leaf: &Leaf<'_>) -> Result<KeyMatch, DerError> {
    let mut key = Reader::new(pkcs8).expect(SEQUENCE)?.reader();
    key.expect(INTEGER)?; // version
    let algorithm = key
        .expect(SEQUENCE)?
        .reader()
        .expect(OBJECT_IDENTIFIER)?
        .contents;
    let private_key = key.expect(OCTET_STRING)?;
    key.optional(explicit(0))?; // attributes
    if algorithm != leaf.algorithm {
        return Ok(KeyMatch::Differs);
    }
    let same = |public: &[u8]| {
        if public == leaf.public_key {
            KeyMatch::Matches
        } else {
            KeyMatch::Differs
        }
    };
    // PKCS#8 v2 (RFC 5958) may carry the public key itself.
    if let Some(public) = key.optional(implicit_primitive(1))? {
        return Ok(same(public.contents));
    }
    if algorithm == EC_PUBLIC_KEY {
        // ECPrivateKey (RFC 5915): version, privateKey, [0] parameters, [1] publicKey.
        let mut ec = private_key.reader().expect(SEQUENCE)?.reader();
        ec.expect(INTEGER)?;
        ec.expect(OCTET_STRING)?;
        ec.optional(explicit(0))?;
        return Ok(match ec.optional(explicit(1))? {
            Some(public) => same(public.reader().expect(BIT_STRING)?.contents),
            None => KeyMatch::Unknown,
        });
    }
    if algorithm == RSA_ENCRYPTION {
        // RSAPrivateKey (RFC 8017): version, modulus, publicExponent, ...; the certificate
        // holds RSAPublicKey: modulus, publicExponent, in a BIT STRING with no unused bits.
        let mut private = private_key.reader().expect(SEQUENCE)?.reader();
        private.expect(INTEGER)?;
        let (n, e) = (private.expect(INTEGER)?, private.expect(INTEGER)?);
        let Some((0, public)) = leaf.public_key.split_first() else {
            return Ok(KeyMatch::Differs);
        };
        let mut public = Reader::new(public).expect(SEQUENCE)?.reader();
        let (pn, pe) = (public.expect(INTEGER)?, public.expect(INTEGER)?);
        return Ok(if n.contents == pn.contents && e.contents == pe.contents {
            KeyMatch::Matches
        } else {
            KeyMatch::Differs
        });
    }
    Ok(KeyMatch::Unknown)
}
