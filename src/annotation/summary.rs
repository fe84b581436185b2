//! The offline `check` command's description of a request.

use std::fmt;

use super::{FEDERATED_BUNDLE_SUFFIX, FederatedBundles, FileContent, IdentityRequest, OnFailure};

impl IdentityRequest {
    /// A human description of what would be delivered where, for the offline `check` command.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let source = if self.agent_address_is_default {
            "daemon default"
        } else {
            "from annotation"
        };
        push_line(
            &mut out,
            "agent socket",
            format_args!("{} ({source})", self.agent_address.display()),
        );
        let attestation = match self.attestation {
            Some(a) => a.as_str(),
            None => "daemon default",
        };
        push_line(&mut out, "attestation", format_args!("{attestation}"));
        match &self.spiffe_id {
            Some(id) => push_line(&mut out, "spiffe id", format_args!("must be {id}")),
            None => push_line(&mut out, "spiffe id", format_args!("any")),
        }
        match &self.hint {
            Some(hint) => push_line(&mut out, "hint", format_args!("{hint:?}")),
            None => push_line(&mut out, "hint", format_args!("none (first SVID)")),
        }
        push_line(
            &mut out,
            "directory",
            format_args!(
                "{} (layout {})",
                self.cert_dir.display(),
                self.files.layout()
            ),
        );
        for file in self.files.files() {
            let what = match file.content {
                FileContent::SvidChain => "X.509-SVID certificate chain, leaf first",
                FileContent::PrivateKey => "private key, PKCS#8",
                FileContent::KeyAndChain => "private key (PKCS#8) then certificate chain",
                FileContent::JwtSvid => "JWT-SVID",
                FileContent::JwtBundle => "JWT bundle (JWKS) of the SVID's trust domain",
                FileContent::TrustBundle => match self.federated_bundles {
                    FederatedBundles::Separate => "trust bundle of the SVID's trust domain",
                    FederatedBundles::Append => {
                        "trust bundle of the SVID's trust domain, federated bundles appended"
                    }
                },
            };
            push_line(
                &mut out,
                "  file",
                format_args!(
                    "{} mode {} ({what})",
                    self.cert_dir.join(&file.name).display(),
                    file.mode
                ),
            );
        }
        if self.federated_bundles == FederatedBundles::Separate {
            push_line(
                &mut out,
                "  file",
                format_args!(
                    "{} mode {} (one per {}trust domain)",
                    self.cert_dir
                        .join(format!("<trust-domain>{FEDERATED_BUNDLE_SUFFIX}"))
                        .display(),
                    self.bundle_mode(),
                    match self.files {
                        crate::annotation::FileSet::Spiffe { .. } => "",
                        _ => "federated ",
                    }
                ),
            );
        }
        if let Some(jwt) = &self.jwt {
            push_line(&mut out, "jwt audience", format_args!("{:?}", jwt.audience));
            for (file, what) in [
                (&jwt.token, "JWT-SVID, refreshed at half its lifetime"),
                (&jwt.bundle, "JWT bundle (JWKS) of the SVID's trust domain"),
            ] {
                push_line(
                    &mut out,
                    "  file",
                    format_args!(
                        "{} mode {} ({what})",
                        self.cert_dir.join(&file.name).display(),
                        file.mode
                    ),
                );
            }
        }
        let on_failure = match self.on_failure {
            OnFailure::Fail => "fail (the container does not start without its identity)",
            OnFailure::Continue => "continue (the container starts; delivery keeps retrying)",
        };
        push_line(&mut out, "on failure", format_args!("{on_failure}"));
        if self.copy_once {
            push_line(
                &mut out,
                "copy once",
                format_args!(
                    "accepted (in a VM without a shared file system, files are never rotated)"
                ),
            );
        }
        out
    }
}

fn push_line(out: &mut String, label: &str, value: fmt::Arguments<'_>) {
    use fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{label:<13} {value}");
}
