//! What the daemon learns from a certificate and a private key by reading their DER
//! structure: the leaf's public key, expiry and URI SANs, and whether a PKCS#8 key is the one
//! that public key belongs to (the start guard's checks; the Broker API source's expiry and
//! the agent's SPIFFE ID). No signature is checked and no arithmetic done: a key either
//! carries its public half (EC keys as SPIRE and most libraries write them, PKCS#8 v2 keys)
//! or is an RSA key, whose modulus and exponent are the public key.

use super::{
    BIT_STRING, DerError, Element, INTEGER, OBJECT_IDENTIFIER, OCTET_STRING, Reader, SEQUENCE,
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
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The parts of a leaf certificate the guard checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf<'a> {
    /// The public key's algorithm OID (contents).
    algorithm: &'a [u8],
    /// The `subjectPublicKey` BIT STRING contents (unused-bits octet first).
    public_key: &'a [u8],
    /// `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
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
    let validity_offset = tbs.offset();
    let mut validity = tbs.expect(SEQUENCE)?.reader();
    time(validity.next_element()?, validity_offset)?; // notBefore
    let not_after = time(validity.next_element()?, validity_offset)?;
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
        not_after,
        uris,
    })
}

/// A `Time` (RFC 5280 4.1.2.5): UTCTime `YYMMDDHHMMSSZ` (years 1950–2049) or GeneralizedTime
/// `YYYYMMDDHHMMSSZ`, as seconds since the Unix epoch. `missing_at` names a missing element.
fn time(element: Option<Element<'_>>, missing_at: usize) -> Result<i64, DerError> {
    let e = element.ok_or(DerError::MissingElement {
        offset: missing_at,
        expected: UTC_TIME,
    })?;
    let bad = DerError::BadTime { offset: e.offset };
    let (year, rest) = match (e.tag, e.contents.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(&e.contents[..2]).ok_or(bad.clone())?;
            (
                if yy >= 50 { 1900 + yy } else { 2000 + yy },
                &e.contents[2..],
            )
        }
        (GENERALIZED_TIME, 15) => (
            digits(&e.contents[..4]).ok_or(bad.clone())?,
            &e.contents[4..],
        ),
        _ => return Err(bad),
    };
    let field = |i: usize| digits(&rest[i..i + 2]);
    let (Some(month), Some(day), Some(hour), Some(minute), Some(second), Some(b'Z')) = (
        field(0),
        field(2),
        field(4),
        field(6),
        field(8),
        rest.get(10).copied(),
    ) else {
        return Err(bad);
    };
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(bad);
    }
    Ok(days_from_civil(year, month, day) * 86_400 + (hour * 3600 + minute * 60 + second))
}

fn digits(ascii: &[u8]) -> Option<i64> {
    ascii.iter().try_fold(0i64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + i64::from(b - b'0'))
    })
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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

#[cfg(test)]
mod tests {
    use super::*;

    fn element(tag: u8, contents: &[u8]) -> Option<Element<'_>> {
        Some(Element {
            tag,
            contents,
            offset: 7,
        })
    }

    #[test]
    fn not_after_agrees_with_x509_parser_across_both_time_encodings() {
        // UTCTime up to 2049, GeneralizedTime from 2050 (RFC 5280), leap days included.
        for (y, m, d) in [
            (1970, 1, 1),
            (1999, 12, 31),
            (2000, 2, 29),
            (2026, 12, 3),
            (2049, 12, 31),
            (2050, 1, 1),
            (2100, 2, 28),
            (2400, 2, 29),
            (9999, 12, 31),
        ] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params =
                rcgen::CertificateParams::new(Vec::<String>::new()).expect("empty names");
            params.not_after = rcgen::date_time_ymd(y, m, d);
            let der = params.self_signed(&key).unwrap().der().to_vec();
            let (_, theirs) = x509_parser::parse_x509_certificate(&der).unwrap();
            let ours = leaf(&der).unwrap().not_after;
            assert_eq!(ours, theirs.validity().not_after.timestamp(), "{y}-{m}-{d}");
        }
        assert_eq!(
            time(element(UTC_TIME, b"261203123456Z"), 0),
            Ok(1_796_301_296)
        );
        assert_eq!(
            time(element(GENERALIZED_TIME, b"19691231235959Z"), 0),
            Ok(-1)
        );
    }

    #[test]
    fn times_rfc_5280_does_not_allow_are_refused_at_their_offset() {
        let bad = Err(DerError::BadTime { offset: 7 });
        for (tag, text) in [
            (UTC_TIME, &b"260230000000Z"[..]),        // 30 February
            (UTC_TIME, b"250229000000Z"),             // not a leap year
            (UTC_TIME, b"261301000000Z"),             // month 13
            (UTC_TIME, b"261203240000Z"),             // hour 24
            (UTC_TIME, b"261203126000Z"),             // minute 60
            (UTC_TIME, b"261203123460Z"),             // second 60
            (UTC_TIME, b"2612031234Z"),               // no seconds
            (UTC_TIME, b"261203123456+0100"),         // an offset, not Z
            (UTC_TIME, b"26120312345 Z"),             // not a digit
            (UTC_TIME, b"+61203123456Z"),             // a sign is not a digit
            (GENERALIZED_TIME, b"20261203123456.5Z"), // fractional seconds
            (GENERALIZED_TIME, b"261203123456Z"),     // two-digit year
            (0x04, b"261203123456Z"),                 // not a time at all
        ] {
            assert_eq!(
                time(element(tag, text), 0),
                bad,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        assert_eq!(
            time(None, 3),
            Err(DerError::MissingElement {
                offset: 3,
                expected: UTC_TIME
            })
        );
    }
}
