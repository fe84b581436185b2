//! Splitting the agent's bundle values into certificates.
//!
//! `SubscribeToX509Bundles` sends each trust domain's CA certificates as raw DER certificates
//! written back to back (not PEM, no count, no separators), so the only way to find where one
//! ends is to read the outer DER header: a SEQUENCE tag and its definite length. Nothing here
//! parses certificate contents; that is left to whoever consumes them.

/// Why a byte string is not a sequence of DER certificates. Offsets count from the start of
/// the whole value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DerError {
    #[error("at byte {offset}: expected a SEQUENCE (tag 0x30), found tag {tag:#04x}")]
    NotASequence { offset: usize, tag: u8 },
    #[error("at byte {offset}: the input ends inside a certificate header")]
    TruncatedHeader { offset: usize },
    #[error("at byte {offset}: a certificate of {len} bytes overruns the input ({remaining} left)")]
    Truncated {
        offset: usize,
        len: usize,
        remaining: usize,
    },
    #[error("at byte {offset}: indefinite or reserved length, not allowed in DER")]
    BadLengthForm { offset: usize },
    #[error("at byte {offset}: length is not minimally encoded")]
    NonMinimalLength { offset: usize },
    #[error("at byte {offset}: a length of {bytes} bytes is beyond any certificate")]
    LengthTooLarge { offset: usize, bytes: usize },
}

/// DER tag of a constructed SEQUENCE, the outer type of an X.509 certificate.
const SEQUENCE: u8 = 0x30;
/// A 4-byte length already allows 4 GiB; anything longer is garbage, not a certificate.
const MAX_LENGTH_BYTES: usize = 4;

/// Splits concatenated DER certificates into one `Vec` per certificate, in order.
///
/// Empty input gives no certificates. Each element is checked to be a SEQUENCE with a
/// minimally encoded definite length that fits the input; the contents are not inspected.
pub fn split_der_certificates(mut input: &[u8]) -> Result<Vec<Vec<u8>>, DerError> {
    let mut certs = Vec::new();
    let mut offset = 0;
    while !input.is_empty() {
        let total = element_len(input, offset)?;
        let (cert, rest) = input.split_at(total);
        certs.push(cert.to_vec());
        input = rest;
        offset += total;
    }
    Ok(certs)
}

/// Length of the whole element (header and contents) at the start of `input`, which is not
/// empty and begins `offset` bytes into the original value.
fn element_len(input: &[u8], offset: usize) -> Result<usize, DerError> {
    let tag = input[0];
    if tag != SEQUENCE {
        return Err(DerError::NotASequence { offset, tag });
    }
    let first = *input.get(1).ok_or(DerError::TruncatedHeader { offset })?;
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let bytes = usize::from(first & 0x7f);
        // 0x80 announces an indefinite length (BER only), 0xff is reserved.
        if bytes == 0 || first == 0xff {
            return Err(DerError::BadLengthForm { offset });
        }
        if bytes > MAX_LENGTH_BYTES {
            return Err(DerError::LengthTooLarge { offset, bytes });
        }
        let digits = input
            .get(2..2 + bytes)
            .ok_or(DerError::TruncatedHeader { offset })?;
        // DER: no leading zero octet, and the long form only for lengths of 128 and up.
        if digits[0] == 0 {
            return Err(DerError::NonMinimalLength { offset });
        }
        let len = digits
            .iter()
            .fold(0usize, |acc, &d| (acc << 8) | usize::from(d));
        if len < 0x80 {
            return Err(DerError::NonMinimalLength { offset });
        }
        (2 + bytes, len)
    };
    let remaining = input.len() - header;
    if len > remaining {
        return Err(DerError::Truncated {
            offset,
            len: header.saturating_add(len),
            remaining: input.len(),
        });
    }
    Ok(header + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(len: usize) -> Vec<u8> {
        let mut out = vec![SEQUENCE];
        match len {
            0..0x80 => out.push(len as u8),
            0x80..=0xff => out.extend([0x81, len as u8]),
            0x100..=0xffff => out.extend([0x82, (len >> 8) as u8, len as u8]),
            _ => out.extend([0x83, (len >> 16) as u8, (len >> 8) as u8, len as u8]),
        }
        out.extend((0..len).map(|i| i as u8));
        out
    }

    #[test]
    fn empty_input_is_no_certificates() {
        assert_eq!(split_der_certificates(&[]), Ok(vec![]));
    }

    #[test]
    fn splits_short_and_long_form_lengths() {
        for sizes in [
            vec![0],
            vec![5],
            vec![0x7f, 0x80],
            vec![0xff, 0x100, 3],
            vec![0x1_0000, 2],
        ] {
            let parts: Vec<Vec<u8>> = sizes.iter().map(|&n| seq(n)).collect();
            let joined = parts.concat();
            assert_eq!(
                split_der_certificates(&joined),
                Ok(parts),
                "sizes {sizes:?}"
            );
        }
    }

    #[test]
    fn rejects_a_wrong_tag_with_its_offset() {
        let mut input = seq(3);
        input.extend([0x31, 0x00]);
        assert_eq!(
            split_der_certificates(&input),
            Err(DerError::NotASequence {
                offset: 5,
                tag: 0x31
            })
        );
        assert!(matches!(
            split_der_certificates(b"-----BEGIN CERTIFICATE-----"),
            Err(DerError::NotASequence { offset: 0, .. })
        ));
    }

    #[test]
    fn rejects_truncated_input() {
        assert_eq!(
            split_der_certificates(&[SEQUENCE]),
            Err(DerError::TruncatedHeader { offset: 0 })
        );
        assert_eq!(
            split_der_certificates(&[SEQUENCE, 0x82, 0x01]),
            Err(DerError::TruncatedHeader { offset: 0 })
        );
        let mut cut = seq(300);
        cut.pop();
        assert_eq!(
            split_der_certificates(&cut),
            Err(DerError::Truncated {
                offset: 0,
                len: 304,
                remaining: 303
            })
        );
        let mut second_cut = seq(2);
        second_cut.extend(&seq(10)[..6]);
        assert!(matches!(
            split_der_certificates(&second_cut),
            Err(DerError::Truncated { offset: 4, .. })
        ));
    }

    #[test]
    fn rejects_non_der_lengths() {
        // Indefinite length (BER) and the reserved form.
        assert_eq!(
            split_der_certificates(&[SEQUENCE, 0x80, 0, 0]),
            Err(DerError::BadLengthForm { offset: 0 })
        );
        assert_eq!(
            split_der_certificates(&[SEQUENCE, 0xff]),
            Err(DerError::BadLengthForm { offset: 0 })
        );
        // Long form for a short length, and a leading zero octet.
        assert_eq!(
            split_der_certificates(&[SEQUENCE, 0x81, 0x05, 1, 2, 3, 4, 5]),
            Err(DerError::NonMinimalLength { offset: 0 })
        );
        assert_eq!(
            split_der_certificates(&[SEQUENCE, 0x82, 0x00, 0x90]),
            Err(DerError::NonMinimalLength { offset: 0 })
        );
        // More length octets than any certificate needs; must not overflow.
        assert_eq!(
            split_der_certificates(&[SEQUENCE, 0x89, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
            Err(DerError::LengthTooLarge {
                offset: 0,
                bytes: 9
            })
        );
        assert!(matches!(
            split_der_certificates(&[SEQUENCE, 0x84, 0xff, 0xff, 0xff, 0xff]),
            Err(DerError::Truncated { .. })
        ));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic fuzz: every prefix and single-byte corruption of a valid input.
        let valid = [seq(3), seq(200), seq(0)].concat();
        for end in 0..=valid.len() {
            let _ = split_der_certificates(&valid[..end]);
        }
        for i in 0..valid.len() {
            for b in [0x00, 0x30, 0x7f, 0x80, 0x81, 0x84, 0x85, 0xff] {
                let mut bad = valid.clone();
                bad[i] = b;
                let _ = split_der_certificates(&bad);
            }
        }
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let n = rng.usize(0..64);
            let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            let _ = split_der_certificates(&bytes);
        }
    }
}
