//! Reading DER: splitting the agent's bundle values into certificates, and walking the few
//! structures the daemon looks into ([`x509`]: certificates and PKCS#8 keys, for the start
//! guard and the Broker API source).
//!
//! `SubscribeToX509Bundles` sends each trust domain's CA certificates as raw DER certificates
//! written back to back (not PEM, no count, no separators), so the only way to find where one
//! ends is to read the outer DER header: a SEQUENCE tag and its definite length. [`Reader`]
//! reads elements one after the other, each as its tag and contents; what the contents mean is
//! left to the caller.

/// Why a byte string is not the DER expected. Offsets count from the start of the value the
/// reader was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DerError {
    #[error("at byte {offset}: expected a SEQUENCE (tag 0x30), found tag {tag:#04x}")]
    NotASequence { offset: usize, tag: u8 },
    #[error("at byte {offset}: expected tag {expected:#04x}, found tag {found:#04x}")]
    UnexpectedTag {
        offset: usize,
        expected: u8,
        found: u8,
    },
    #[error("at byte {offset}: expected tag {expected:#04x}, found the end of the input")]
    MissingElement { offset: usize, expected: u8 },
    #[error("at byte {offset}: multi-byte tags are not used by the structures read here")]
    HighTagNumber { offset: usize },
    #[error("at byte {offset}: the input ends inside an element header")]
    TruncatedHeader { offset: usize },
    #[error("at byte {offset}: an element of {len} bytes overruns the input ({remaining} left)")]
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
    #[error("at byte {offset}: not a UTCTime or GeneralizedTime as RFC 5280 writes them")]
    BadTime { offset: usize },
}

pub mod x509;

/// DER tag of a constructed SEQUENCE, the outer type of an X.509 certificate.
pub const SEQUENCE: u8 = 0x30;
pub const INTEGER: u8 = 0x02;
pub const BIT_STRING: u8 = 0x03;
pub const OCTET_STRING: u8 = 0x04;
pub const OBJECT_IDENTIFIER: u8 = 0x06;
/// A 4-byte length already allows 4 GiB; anything longer is garbage, not a certificate.
const MAX_LENGTH_BYTES: usize = 4;
/// The low five bits of a tag all set announce a multi-byte tag number.
const HIGH_TAG_NUMBER: u8 = 0x1f;

/// Splits concatenated DER certificates into one `Vec` per certificate, in order.
///
/// Empty input gives no certificates. Each element is checked to be a SEQUENCE with a
/// minimally encoded definite length that fits the input; the contents are not inspected.
pub fn split_der_certificates(input: &[u8]) -> Result<Vec<Vec<u8>>, DerError> {
    let mut reader = Reader::new(input);
    let mut certs = Vec::new();
    while !reader.is_empty() {
        let offset = reader.offset;
        let tag = input[offset];
        if tag != SEQUENCE {
            return Err(DerError::NotASequence { offset, tag });
        }
        let element = reader.next_raw()?;
        certs.push(element.to_vec());
    }
    Ok(certs)
}

/// One element: its tag byte and its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Element<'a> {
    pub tag: u8,
    pub contents: &'a [u8],
    /// Where the contents start, counted from the start of the outermost value.
    pub offset: usize,
}

impl<'a> Element<'a> {
    /// A reader over the contents of this (constructed) element.
    pub fn reader(&self) -> Reader<'a> {
        Reader {
            input: self.contents,
            offset: 0,
            base: self.offset,
        }
    }
}

/// Reads DER elements one after the other.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    input: &'a [u8],
    offset: usize,
    /// Offset of `input` in the outermost value, for messages.
    base: usize,
}

impl<'a> Reader<'a> {
    pub fn new(input: &'a [u8]) -> Reader<'a> {
        Reader {
            input,
            offset: 0,
            base: 0,
        }
    }

    /// Where the next element starts, counted from the start of the outermost value.
    pub fn offset(&self) -> usize {
        self.base + self.offset
    }

    /// Whether every element has been read.
    pub fn is_empty(&self) -> bool {
        self.offset >= self.input.len()
    }

    /// The tag of the next element, if any.
    pub fn peek_tag(&self) -> Option<u8> {
        self.input.get(self.offset).copied()
    }

    /// The next element.
    pub fn next_element(&mut self) -> Result<Option<Element<'a>>, DerError> {
        if self.is_empty() {
            return Ok(None);
        }
        let start = self.offset;
        let (header, len) = header(&self.input[start..], self.base + start)?;
        let tag = self.input[start];
        let contents = &self.input[start + header..start + header + len];
        self.offset = start + header + len;
        Ok(Some(Element {
            tag,
            contents,
            offset: self.base + start + header,
        }))
    }

    /// The next element, which must have `tag`.
    pub fn expect(&mut self, tag: u8) -> Result<Element<'a>, DerError> {
        let offset = self.base + self.offset;
        match self.next_element()? {
            Some(e) if e.tag == tag => Ok(e),
            Some(e) => Err(DerError::UnexpectedTag {
                offset,
                expected: tag,
                found: e.tag,
            }),
            None => Err(DerError::MissingElement {
                offset,
                expected: tag,
            }),
        }
    }

    /// The next element if it has `tag` (an OPTIONAL field); nothing is consumed otherwise.
    pub fn optional(&mut self, tag: u8) -> Result<Option<Element<'a>>, DerError> {
        if self.peek_tag() == Some(tag) {
            self.next_element()
        } else {
            Ok(None)
        }
    }

    /// The next element with its header, as bytes.
    fn next_raw(&mut self) -> Result<&'a [u8], DerError> {
        let start = self.offset;
        self.next_element()?;
        Ok(&self.input[start..self.offset])
    }
}

/// Header length and contents length of the element at the start of `input`, which is not
/// empty and begins `offset` bytes into the original value.
fn header(input: &[u8], offset: usize) -> Result<(usize, usize), DerError> {
    if input[0] & HIGH_TAG_NUMBER == HIGH_TAG_NUMBER {
        return Err(DerError::HighTagNumber { offset });
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
    Ok((header, len))
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
    fn the_reader_walks_nested_elements_and_optional_fields() {
        // SEQUENCE { INTEGER 5, [0] { OCTET STRING "ab" }, BIT STRING 00 ff }
        let value = [
            0x30, 0x0d, 0x02, 0x01, 0x05, 0xa0, 0x04, 0x04, 0x02, b'a', b'b', 0x03, 0x02, 0x00,
            0xff,
        ];
        let mut outer = Reader::new(&value);
        let seq = outer.expect(SEQUENCE).unwrap();
        assert!(outer.is_empty());
        let mut r = seq.reader();
        assert_eq!(r.expect(INTEGER).unwrap().contents, [5]);
        assert_eq!(r.optional(0xa1).unwrap(), None, "absent optional field");
        let tagged = r.optional(0xa0).unwrap().unwrap();
        assert_eq!(
            tagged.reader().expect(OCTET_STRING).unwrap().contents,
            b"ab"
        );
        let bits = r.expect(BIT_STRING).unwrap();
        assert_eq!((bits.contents, bits.offset), (&[0x00, 0xff][..], 13));
        assert_eq!(
            r.expect(INTEGER),
            Err(DerError::MissingElement {
                offset: 15,
                expected: INTEGER
            })
        );
        let mut r = seq.reader();
        assert_eq!(
            r.expect(OCTET_STRING),
            Err(DerError::UnexpectedTag {
                offset: 2,
                expected: OCTET_STRING,
                found: INTEGER
            })
        );
        assert_eq!(
            Reader::new(&[0x1f, 0x81, 0x00]).next_element(),
            Err(DerError::HighTagNumber { offset: 0 })
        );
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
        fn walk(r: &mut Reader<'_>, depth: usize) {
            while let Ok(Some(e)) = r.next_element() {
                if depth < 8 && e.tag & 0x20 != 0 {
                    walk(&mut e.reader(), depth + 1);
                }
            }
        }
        for i in 0..valid.len() {
            let mut bad = valid.clone();
            bad[i] ^= 0x5a;
            walk(&mut Reader::new(&bad), 0);
        }
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let n = rng.usize(0..64);
            let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            let _ = split_der_certificates(&bytes);
            walk(&mut Reader::new(&bytes), 0);
        }
    }
}
