//! What both sources accept of a JWT-SVID and a JWT bundle, whichever API carried them: a
//! token is passed on to the workload only as a compact JWS that cannot break its file's one
//! line, and a bundle only as a JWKS-shaped document.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroizing;

use super::client::trust_domain;
use super::{DecodeError, JwtBundleSet, JwtSvid, MAX_JWT_BYTES, SourceError};
use crate::spiffe::SpiffeId;

/// Three non-empty base64url parts separated by dots, within [`MAX_JWT_BYTES`]: what the file
/// may hold, so that no byte of it can break the reader's line or the file's meaning.
fn compact_jws(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    token.len() <= MAX_JWT_BYTES
        && parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Seconds since the Unix epoch: the clock JWT claims and the metrics' expiry gauges use.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A token as a source read it off its wire: the SPIFFE ID and times are read differently by
/// each API, the checks after that are the same.
pub(super) struct Sent {
    pub spiffe_id: SpiffeId,
    pub token: Zeroizing<String>,
    pub issued_at: i64,
    pub expires_at: i64,
    pub hint: String,
}

/// Why a wire entry cannot be used: a sentence after "sent a JWT-SVID", and the SPIFFE ID when
/// it could be read.
pub(super) type Unusable = (Option<SpiffeId>, String);

/// The usable tokens of one message. `read` takes an entry apart the sender's way; an entry it
/// cannot read, or that [`checked`] refuses, is logged and dropped rather than failing the
/// others (the agent never sends such tokens).
pub(super) fn usable<W>(
    sender: &str,
    entries: Vec<W>,
    read: impl Fn(W) -> Result<Sent, Unusable>,
) -> Vec<JwtSvid> {
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        match read(entry).and_then(|sent| checked(sent).map_err(|(id, p)| (Some(id), p.to_owned())))
        {
            Ok(svid) => out.push(svid),
            Err((Some(spiffe_id), problem)) => {
                tracing::warn!(%spiffe_id, "{sender} sent a JWT-SVID that {problem}; ignored");
            }
            Err((None, problem)) => {
                tracing::warn!("{sender} sent a JWT-SVID {problem}; ignored");
            }
        }
    }
    out
}

/// A token that may be passed on, or why it cannot be.
fn checked(sent: Sent) -> Result<JwtSvid, (SpiffeId, &'static str)> {
    let Sent {
        spiffe_id,
        token,
        issued_at,
        expires_at,
        hint,
    } = sent;
    if !compact_jws(&token) {
        return Err((spiffe_id, "is not a compact JWS"));
    }
    if expires_at <= issued_at {
        return Err((spiffe_id, "expires before it was issued"));
    }
    Ok(JwtSvid {
        spiffe_id,
        token,
        expires_at,
        issued_at,
        hint,
    })
}

/// The `iat` and `exp` claims of a compact JWS, for the Broker API, whose messages carry no
/// expiry. Only these two are read (the signature is the workload's to check, against the
/// bundle); `iat` may be absent (then `now`), `exp` may not. The payload is bounded by
/// [`MAX_JWT_BYTES`] before it is decoded.
pub(super) fn claimed_times(token: &str, now: i64) -> Result<(i64, i64), &'static str> {
    if token.len() > MAX_JWT_BYTES {
        return Err("is longer than the largest token accepted");
    }
    let mut parts = token.split('.');
    let payload = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(payload), Some(_), None) => payload,
        _ => return Err("is not a compact JWS"),
    };
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| "has a payload that is not base64url")?;
    let claims: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|_| "has a payload that is not a JSON object")?;
    // NumericDate: seconds, possibly with a fraction; whole seconds are what is compared.
    let seconds = |v: &serde_json::Value| {
        v.as_i64().or_else(|| {
            v.as_f64()
                .filter(|f| f.is_finite() && f.abs() < 1e15)
                .map(|f| f as i64)
        })
    };
    let exp = claims
        .get("exp")
        .ok_or("has no exp claim")
        .and_then(|v| seconds(v).ok_or("has an exp claim that is not a number"))?;
    let iat = match claims.get("iat") {
        None => now,
        Some(v) => seconds(v).ok_or("has an iat claim that is not a number")?,
    };
    Ok((iat, exp))
}

/// Each trust domain's JWKS document, checked to be a JSON object with a `keys` array; any
/// other value fails the whole message (a bundle the workload could not use must not replace
/// a good one).
pub(super) fn bundle_set(
    bundles: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> Result<JwtBundleSet, SourceError> {
    let mut out = BTreeMap::new();
    for (key, jwks) in bundles {
        let Some(td) = trust_domain(&key, "a JWT bundle") else {
            continue;
        };
        let problem = match serde_json::from_slice::<serde_json::Value>(&jwks) {
            Ok(serde_json::Value::Object(doc)) => match doc.get("keys") {
                Some(serde_json::Value::Array(_)) => None,
                _ => Some("no `keys` array"),
            },
            Ok(_) => Some("not a JSON object"),
            Err(_) => Some("not JSON"),
        };
        if let Some(problem) = problem {
            return Err(DecodeError::JwtBundle {
                trust_domain: key,
                problem,
            }
            .into());
        }
        out.insert(td, jwks);
    }
    Ok(JwtBundleSet { bundles: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(payload: &str) -> String {
        format!("aGVh.{}.c2ln", URL_SAFE_NO_PAD.encode(payload))
    }

    #[test]
    fn times_come_from_the_exp_and_iat_claims() {
        assert_eq!(
            claimed_times(&token(r#"{"exp":200,"iat":100,"sub":"x"}"#), 5),
            Ok((100, 200))
        );
        assert_eq!(claimed_times(&token(r#"{"exp":200.9}"#), 5), Ok((5, 200)));
    }

    #[test]
    fn tokens_without_readable_times_are_refused_by_reason() {
        for (t, why) in [
            (token(r#"{"iat":100}"#), "has no exp claim"),
            (
                token(r#"{"exp":"soon"}"#),
                "has an exp claim that is not a number",
            ),
            (
                token(r#"{"exp":1e300}"#),
                "has an exp claim that is not a number",
            ),
            (
                token(r#"{"exp":2,"iat":[]}"#),
                "has an iat claim that is not a number",
            ),
            (token("[1]"), "has a payload that is not a JSON object"),
            (
                "aGVh.!!.c2ln".to_owned(),
                "has a payload that is not base64url",
            ),
            ("aGVh.cGF5".to_owned(), "is not a compact JWS"),
            ("a.b.c.d".to_owned(), "is not a compact JWS"),
            (
                format!("a.{}.c", "b".repeat(MAX_JWT_BYTES)),
                "is longer than the largest token accepted",
            ),
        ] {
            assert_eq!(claimed_times(&t, 0), Err(why), "{t:.60}");
        }
    }
}
