//! The DER reader of `src/der.rs`: the agent's bundle values (DER certificates written back
//! to back, split by their outer SEQUENCE headers, `split_der_certificates`) and the element
//! walk the start guard reads certificates and keys with (`der::Reader`).
//!
//! Holds: no panic or overflow on any length encoding; a split gives back exactly the input
//! when joined, each part a SEQUENCE whose minimal definite-length header covers it; elements
//! built from arbitrary lengths split into exactly those elements; every element the reader
//! walks to, however deep, has contents that are the bytes at its offset in the input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nri_identity_injector::der::{Reader, split_der_certificates};

enum Input {
    Raw(Vec<u8>),
    /// Content lengths of well-formed elements (short and long forms, up to [`MAX_BUILT`]
    /// bytes in all), then a tail of raw bytes.
    Built(Vec<u16>, Vec<u8>),
}

impl Input {
    /// Layout (so that real bundles are seeds): a first byte that is even for raw bytes (the
    /// rest), odd for built elements (the rest, read as lengths and a tail).
    fn from_bytes(data: &[u8]) -> Option<Input> {
        let (first, rest) = data.split_first()?;
        if first % 2 == 0 {
            return Some(Input::Raw(rest.to_vec()));
        }
        let mut u = arbitrary::Unstructured::new(rest);
        let lens: Vec<u16> = u.arbitrary().ok()?;
        Some(Input::Built(lens, u.take_rest().to_vec()))
    }
}

/// Content bytes of all built elements together.
const MAX_BUILT: usize = 64 << 10;

fn header(len: usize) -> Vec<u8> {
    let mut h = vec![0x30];
    if len < 0x80 {
        h.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        h.push(0x80 | bytes.len() as u8);
        h.extend(bytes);
    }
    h
}

fn check_part(part: &[u8]) {
    assert_eq!(part[0], 0x30);
    let first = part[1];
    let (hlen, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        assert!((1..=4).contains(&n), "length of {n} bytes");
        assert_ne!(part[2], 0, "leading zero length octet");
        let len = part[2..2 + n]
            .iter()
            .fold(0usize, |a, b| (a << 8) | usize::from(*b));
        assert!(len >= 0x80, "long form for a short length");
        (2 + n, len)
    };
    assert_eq!(hlen + len, part.len(), "header does not cover the part");
}

/// Walks every element, descending into constructed ones (bounded depth, as the guard's
/// structures are).
fn walk(input: &[u8], reader: &mut Reader<'_>, depth: usize) {
    while let Ok(Some(e)) = reader.next_element() {
        let end = e.offset + e.contents.len();
        assert!(end <= input.len(), "element past the end");
        assert_eq!(
            &input[e.offset..end],
            e.contents,
            "contents not at their offset"
        );
        if depth < 16 && e.tag & 0x20 != 0 {
            walk(input, &mut e.reader(), depth + 1);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::from_bytes(data) else {
        return;
    };
    let (bytes, built) = match input {
        Input::Raw(b) => (b, None),
        Input::Built(lens, tail) => {
            let mut parts = Vec::new();
            let mut total = 0;
            for (i, len) in lens.iter().take(64).enumerate() {
                // The top two bits pick a length form (short, one and two length octets), so
                // that most elements stay small and a run spends its time on headers, not on
                // copying megabytes.
                let len = usize::from(match len >> 14 {
                    0 => len & 0x7f,
                    1 => len & 0xff,
                    _ => len & 0x3fff,
                });
                total += len;
                if total > MAX_BUILT {
                    break;
                }
                let mut p = header(len);
                p.extend(std::iter::repeat_n(i as u8, len));
                parts.push(p);
            }
            let mut bytes = parts.concat();
            let tail_empty = tail.is_empty();
            bytes.extend(tail);
            (bytes, tail_empty.then_some(parts))
        }
    };
    walk(&bytes, &mut Reader::new(&bytes), 0);
    let result = split_der_certificates(&bytes);
    if let Ok(parts) = &result {
        assert_eq!(parts.concat(), bytes, "split loses or adds bytes");
        for p in parts {
            check_part(p);
        }
    }
    if let Some(parts) = built {
        assert_eq!(result.as_ref(), Ok(&parts), "well-formed elements");
    }
});
