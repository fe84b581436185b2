//! The daemon's configuration: a TOML file and `NRI_IDENTITY_*` environment variables,
//! merged over the defaults and validated (`Config::load`).
//!
//! Holds: no panic; a configuration that loads is valid, its derived settings (annotation
//! policy, kubelet endpoint, sandbox classes) build, and what `nri-identity-injector config`
//! prints for it (`Config::to_toml`) loads back to the same configuration.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nri_identity_injector::config::{Config, Overrides};

const KEYS: &[&str] = &[
    "runtime",
    "nri_socket",
    "plugin_name",
    "plugin_index",
    "agent_socket",
    "allowed_agent_sockets",
    "artifact_root",
    "first_svid_timeout_ms",
    "attestation",
    "kubelet_url",
    "kubelet_ca_path",
    "kubelet_skip_verification",
    "kubelet_server_name",
    "kubelet_token_path",
    "kubelet_certificate_path",
    "kubelet_private_key_path",
    "log_format",
    "log_level",
    "http_address",
    "drain_timeout_ms",
    "selinux_label",
    "vm_runtime_handlers",
    "copy_once_runtime_handlers",
];

/// Layout (so that real configurations are seeds): environment lines `KEY=value` (a key
/// without the `NRI_IDENTITY_` prefix gets it; `#N=value` names the N-th known key), a NUL,
/// then the TOML file; without a NUL the whole input is the file, and an input starting with
/// NUL has no file.
struct Input {
    file: Option<String>,
    env: Vec<(String, String)>,
}

impl Input {
    fn from_bytes(data: &[u8]) -> Input {
        let text = String::from_utf8_lossy(data);
        let (env, file) = match text.split_once('\0') {
            Some((env, file)) => (env, (!env.is_empty() || !file.is_empty()).then_some(file)),
            None => ("", Some(text.as_ref())),
        };
        let file = if data.first() == Some(&0) { None } else { file };
        let env = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| {
                let key = match k.strip_prefix('#').and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) => KEYS[n % KEYS.len()].to_ascii_uppercase(),
                    None => k.strip_prefix("NRI_IDENTITY_").unwrap_or(k).to_owned(),
                };
                (format!("NRI_IDENTITY_{key}"), v.to_owned())
            })
            .collect();
        Input {
            file: file.map(str::to_owned),
            env,
        }
    }
}

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("nii-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

fn load(toml: Option<&str>, env: Vec<(String, String)>, name: &str) -> Result<Config, String> {
    let path = scratch().join(name);
    if let Some(text) = toml {
        std::fs::write(&path, text).expect("scratch file");
    }
    Config::load(toml.map(|_| path.as_path()), env, &Overrides::default())
        .map_err(|e| e.to_string())
}

fuzz_target!(|data: &[u8]| {
    let input = Input::from_bytes(data);
    let Ok(config) = load(input.file.as_deref(), input.env, "config.toml") else {
        return;
    };
    config.validate().expect("a loaded configuration is valid");
    let _ = config.annotation_policy();
    let _ = config.kubelet_endpoint();
    let _ = config.sandbox_classes();
    let _ = config.default_attestation();
    let rendered = config.to_toml();
    match load(Some(&rendered), Vec::new(), "rendered.toml") {
        Ok(again) => assert_eq!(again, config, "printed configuration:\n{rendered}"),
        Err(e) => panic!("the printed configuration does not load: {e}\n{rendered}"),
    }
});
