#!/usr/bin/env python3
"""Verifies a JWT-SVID file against a JWKS file, as a relying party would.

    jwt_verify.py TOKEN-FILE JWKS-FILE EXPECTED-SUB EXPECTED-AUD

Checks the signature with the key the header's `kid` names (ES256/384/512, RS256/384/512,
PS256/384/512), `sub`, that `aud` holds the expected audience, and that `exp` is in the
future. Prints `ok sub=... aud=... exp_in=...s` or exits 1 with the reason. Needs the
`cryptography` package only.
"""
import base64
import json
import sys
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature


def b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def num(part: str) -> int:
    return int.from_bytes(b64(part), "big")


HASHES = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}
CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}


def fail(why: str) -> None:
    print(f"FAIL {why}")
    sys.exit(1)


def main() -> None:
    token_file, jwks_file, want_sub, want_aud = sys.argv[1:5]
    token = open(token_file, encoding="ascii").read()
    if token != token.strip():
        fail("token file has surrounding whitespace")
    parts = token.split(".")
    if len(parts) != 3:
        fail(f"not a compact JWS ({len(parts)} parts)")
    header, claims = json.loads(b64(parts[0])), json.loads(b64(parts[1]))
    signed, sig = f"{parts[0]}.{parts[1]}".encode(), b64(parts[2])
    keys = [k for k in json.load(open(jwks_file))["keys"] if k.get("kid") == header.get("kid")]
    if not keys:
        fail(f"no key {header.get('kid')!r} in the JWKS")
    jwk, alg = keys[0], header.get("alg", "")
    digest = HASHES.get(alg[2:])
    if digest is None:
        fail(f"unsupported alg {alg}")
    try:
        if alg.startswith("ES"):
            pub = ec.EllipticCurvePublicNumbers(num(jwk["x"]), num(jwk["y"]), CURVES[jwk["crv"]]).public_key()
            half = len(sig) // 2
            der = encode_dss_signature(int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big"))
            pub.verify(der, signed, ec.ECDSA(digest))
        else:
            pub = rsa.RSAPublicNumbers(num(jwk["e"]), num(jwk["n"])).public_key()
            pad = padding.PKCS1v15() if alg.startswith("RS") else padding.PSS(padding.MGF1(digest), digest.digest_size)
            pub.verify(sig, signed, pad, digest)
    except Exception as e:  # noqa: BLE001 - any failure is a bad signature here
        fail(f"signature does not verify with key {jwk.get('kid')}: {e!r}")
    if claims.get("sub") != want_sub:
        fail(f"sub is {claims.get('sub')!r}, want {want_sub!r}")
    aud = claims.get("aud")
    aud = [aud] if isinstance(aud, str) else aud or []
    if want_aud not in aud:
        fail(f"aud is {aud!r}, want {want_aud!r}")
    left = int(claims.get("exp", 0)) - int(time.time())
    if left <= 0:
        fail(f"expired {-left}s ago")
    print(f"ok sub={claims['sub']} aud={','.join(aud)} exp_in={left}s alg={alg}")


if __name__ == "__main__":
    main()
