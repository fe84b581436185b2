//! SPIFFE names: [`TrustDomain`] and [`SpiffeId`], each parsed in exactly one place.
//!
//! Names reach the daemon from pods (an annotation's `spiffe_id`) and from the SPIRE agent
//! (SVID IDs, bundle keys, federated trust domains); federated trust domain names even become
//! file names. Every one of them goes through these parsers.

use std::borrow::Borrow;
use std::fmt;

/// The SPIFFE ID specification caps IDs at 2048 bytes.
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;
/// The SPIFFE ID specification caps trust domain names at 255 bytes.
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;

const SPIFFE_SCHEME: &str = "spiffe://";

/// A trust domain name such as `example.org`: 1 to 255 bytes of `a-z`, `0-9`, `.`, `-`, `_`.
///
/// Ordered and compared by name, and borrowable as it, so maps keyed by trust domain can be
/// looked up with a `&str`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// Why a string is not a trust domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TrustDomainError {
    #[error("is empty")]
    Empty,
    #[error("is over {max} bytes")]
    TooLong { max: usize },
    #[error("has characters other than a-z, 0-9, '.', '-', '_'")]
    Character,
}

impl TrustDomain {
    /// Parses a trust domain given by name (`example.org`) or in its ID form
    /// (`spiffe://example.org`, as the agent keys bundles). The scheme and name must be
    /// lowercase: the specification makes them case-insensitive but requires implementations
    /// to emit lowercase, so anything else is a typo or an attempt to confuse a comparison.
    pub fn parse(s: &str) -> Result<Self, TrustDomainError> {
        let name = s.strip_prefix(SPIFFE_SCHEME).unwrap_or(s);
        Self::check(name)?;
        Ok(TrustDomain(name.to_owned()))
    }

    fn check(name: &str) -> Result<(), TrustDomainError> {
        if name.is_empty() {
            return Err(TrustDomainError::Empty);
        }
        if name.len() > MAX_TRUST_DOMAIN_BYTES {
            return Err(TrustDomainError::TooLong {
                max: MAX_TRUST_DOMAIN_BYTES,
            });
        }
        if !name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
        {
            return Err(TrustDomainError::Character);
        }
        Ok(())
    }

    /// The name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The trust domain's SPIFFE ID, e.g. `spiffe://example.org`.
    pub fn id(&self) -> String {
        format!("{SPIFFE_SCHEME}{}", self.0)
    }
}

/// The name.
impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Borrow<str> for TrustDomain {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for TrustDomain {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for TrustDomain {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// A validated SPIFFE ID of a workload: `spiffe://<trust-domain>/<path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    id: String,
    trust_domain: TrustDomain,
}

/// Why a string is not a valid workload SPIFFE ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("is over {max} bytes")]
    TooLong { max: usize },
    #[error("does not start with spiffe://")]
    MissingScheme,
    #[error("has an empty trust domain")]
    EmptyTrustDomain,
    #[error("has a trust domain over {max} bytes")]
    TrustDomainTooLong { max: usize },
    #[error("has a trust domain with characters other than a-z, 0-9, '.', '-', '_'")]
    TrustDomainCharacter,
    #[error("has no path")]
    MissingPath,
    #[error("has an empty path segment")]
    EmptySegment,
    #[error("has a '.' or '..' path segment")]
    DotSegment,
    #[error("has a path with characters other than A-Z, a-z, 0-9, '.', '-', '_'")]
    PathCharacter,
}

impl From<TrustDomainError> for SpiffeIdError {
    fn from(e: TrustDomainError) -> Self {
        match e {
            TrustDomainError::Empty => SpiffeIdError::EmptyTrustDomain,
            TrustDomainError::TooLong { max } => SpiffeIdError::TrustDomainTooLong { max },
            TrustDomainError::Character => SpiffeIdError::TrustDomainCharacter,
        }
    }
}

impl SpiffeId {
    /// Parses a workload ID: a [`TrustDomain`] and a non-empty path of non-empty segments
    /// other than `.` and `..`, made of `A-Z`, `a-z`, `0-9`, `.`, `-`, `_`.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > MAX_SPIFFE_ID_BYTES {
            return Err(SpiffeIdError::TooLong {
                max: MAX_SPIFFE_ID_BYTES,
            });
        }
        let rest = s
            .strip_prefix(SPIFFE_SCHEME)
            .ok_or(SpiffeIdError::MissingScheme)?;
        let (name, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        TrustDomain::check(name)?;
        if path.is_empty() {
            return Err(SpiffeIdError::MissingPath);
        }
        // `path` starts with '/', so the first item of the split is the empty prefix.
        for segment in path.split('/').skip(1) {
            if segment.is_empty() {
                return Err(SpiffeIdError::EmptySegment);
            }
            if segment == "." || segment == ".." {
                return Err(SpiffeIdError::DotSegment);
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err(SpiffeIdError::PathCharacter);
            }
        }
        Ok(Self {
            id: s.to_owned(),
            trust_domain: TrustDomain(name.to_owned()),
        })
    }

    /// The ID of `path` in `trust_domain`, as the agent sends them apart. The agent sends
    /// paths with their leading `/`; a bare one is accepted too.
    pub fn from_parts(trust_domain: &str, path: &str) -> Result<Self, SpiffeIdError> {
        let name = trust_domain
            .strip_prefix(SPIFFE_SCHEME)
            .unwrap_or(trust_domain);
        let slash = if path.starts_with('/') { "" } else { "/" };
        Self::parse(&format!("{SPIFFE_SCHEME}{name}{slash}{path}"))
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        let start = SPIFFE_SCHEME.len() + self.trust_domain.name().len();
        self.id.get(start..).unwrap_or_default()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl PartialEq<str> for SpiffeId {
    fn eq(&self, other: &str) -> bool {
        self.id == other
    }
}

impl PartialEq<&str> for SpiffeId {
    fn eq(&self, other: &&str) -> bool {
        self.id == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domains_parse_by_name_or_id_and_refuse_anything_else() {
        let td = TrustDomain::parse("example.org").unwrap();
        assert_eq!(td.name(), "example.org");
        assert_eq!(td.id(), "spiffe://example.org");
        assert_eq!(TrustDomain::parse("spiffe://example.org").unwrap(), td);
        for (bad, why) in [
            ("", TrustDomainError::Empty),
            ("spiffe://", TrustDomainError::Empty),
            ("Example.org", TrustDomainError::Character),
            ("SPIFFE://example.org", TrustDomainError::Character),
            ("spiffe://example.org/", TrustDomainError::Character),
            ("a/b", TrustDomainError::Character),
            ("ex ample", TrustDomainError::Character),
            ("nul\0", TrustDomainError::Character),
        ] {
            assert_eq!(TrustDomain::parse(bad), Err(why), "{bad:?}");
        }
        assert_eq!(
            TrustDomain::parse(&"a".repeat(256)),
            Err(TrustDomainError::TooLong { max: 255 })
        );
        assert!(TrustDomain::parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn ids_split_into_trust_domain_and_path() {
        let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert_eq!(
            SpiffeId::from_parts("example.org", "/ns/default/sa/web").unwrap(),
            id
        );
        assert_eq!(
            SpiffeId::from_parts("spiffe://example.org", "ns/default/sa/web").unwrap(),
            id
        );
        assert_eq!(
            SpiffeId::from_parts("Example.org", "/a"),
            Err(SpiffeIdError::TrustDomainCharacter)
        );
        assert_eq!(
            SpiffeId::from_parts("example.org", ""),
            Err(SpiffeIdError::EmptySegment),
            "an ID with an empty path is not a workload's"
        );
    }
}
