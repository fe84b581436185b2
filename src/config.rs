//! Daemon configuration: a pure function of its sources, defaults < file < environment <
//! flags, validated before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
pub use nri_identity_backends::Attestation;
use nri_identity_backends::{RuntimeKind, SandboxClasses};
use serde::{Deserialize, Serialize};

use crate::k8s::{ClientAuth, Endpoint, KubeletUrl, Scheme, TlsSettings};
use crate::limits::IdentityLimits;
pub use crate::selinux::SelinuxLabel;

/// Prefix of the environment variables that override the file, e.g.
/// `NRI_IDENTITY_AGENT_SOCKET=/run/spire/admin.sock`.
pub const ENV_PREFIX: &str = "NRI_IDENTITY_";

/// Where Kubernetes mounts a pod's service-account token and the cluster CA. The `/var/run`
/// spelling, not `/run`: a `FROM scratch` image has no `/var/run -> /run` link.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, span fields included.
    Json,
}

/// Which SPIRE agent API the daemon gets workload identities from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IdentityApi {
    /// The Delegated Identity API on the agent's admin socket (`agent_socket`).
    #[default]
    Delegated,
    /// The SPIFFE Broker API on the agent's broker endpoint (`broker_socket`), over mutual TLS
    /// with the daemon's own SVID from the Workload API (`workload_api_socket`).
    Broker,
}

/// Everything the daemon can be told. Field names are the file keys (TOML) and, upper-cased
/// with [`ENV_PREFIX`], the environment variables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The container runtime whose NRI socket we serve: `containerd` or `cri-o`. Unset: the
    /// one that connects (it names itself at NRI Configure); set: any other is refused.
    pub runtime: Option<RuntimeKind>,
    /// The runtime's NRI socket. A runtime that launched us hands over a socket instead.
    pub nri_socket: PathBuf,
    /// NRI plugin name and two-digit index.
    pub plugin_name: String,
    pub plugin_index: String,
    /// Which agent API serves workload identities: `delegated` (default) or `broker`.
    pub identity_api: IdentityApi,
    /// The SPIRE agent's admin socket (Delegated Identity API).
    pub agent_socket: PathBuf,
    /// The SPIRE agent's broker endpoint socket (Broker API, `identity_api = "broker"`): the
    /// agent's `experimental.broker.socket_path`.
    pub broker_socket: PathBuf,
    /// The SPIRE agent's Workload API socket, where the daemon gets the X.509 SVID it presents
    /// to the broker endpoint (`identity_api = "broker"`).
    pub workload_api_socket: PathBuf,
    /// Which of the daemon's own SVIDs to present to the broker endpoint, when its Workload
    /// API lists several; unset: the first.
    pub broker_spiffe_id: Option<String>,
    /// Further agent sockets that annotations may name. By default only the socket of the
    /// chosen API (`agent_socket` or `broker_socket`): a pod must never point the daemon at
    /// an arbitrary host socket.
    pub allowed_agent_sockets: Vec<PathBuf>,
    /// Host directory under which `<pod-uid>/<container-id>/` directories are created.
    pub artifact_root: PathBuf,
    /// How long StartContainer may wait for the first SVID. Must stay below the runtime's
    /// request timeout (2 s by default), or the runtime drops the plugin and starts the
    /// container without identity.
    pub first_svid_timeout_ms: u64,
    /// How workloads are named to the agent when the pod does not say: `pid` or
    /// `selectors`. Unset: `selectors` when `kubelet_url` is set (Kubernetes), else the
    /// runtime backend's default (`pid` for containerd).
    pub attestation: Option<Attestation>,
    /// The kubelet, where selectors mode looks up what CRI/NRI do not carry (the pod's
    /// service account and owners): its secure port `https://<node-ip>:10250`, or its
    /// read-only port `http://127.0.0.1:10255`.
    pub kubelet_url: Option<KubeletUrl>,
    /// CA bundle the kubelet's serving certificate must chain to (secure port).
    pub kubelet_ca_path: PathBuf,
    /// Accept any kubelet serving certificate (self-signed ones). The handshake still
    /// proves the kubelet holds its key, but not who it is.
    pub kubelet_skip_verification: bool,
    /// The name the kubelet's serving certificate must carry; default the URL's host.
    pub kubelet_server_name: Option<String>,
    /// Bearer token for the secure port, re-read for every connection (projected tokens
    /// rotate). Unused when a client certificate is configured.
    pub kubelet_token_path: PathBuf,
    /// Client certificate and key for the secure port, instead of the token.
    pub kubelet_certificate_path: Option<PathBuf>,
    pub kubelet_private_key_path: Option<PathBuf>,
    pub log_format: LogFormat,
    /// A tracing filter, e.g. `info` or `nri_identity_injector=debug,info`.
    pub log_level: String,
    /// Where `/healthz`, `/readyz` and `/metrics` are served; unset disables them.
    pub http_address: Option<SocketAddr>,
    /// How long SIGTERM waits for in-flight work before exiting.
    pub drain_timeout_ms: u64,
    /// The SELinux label of the identity files: `auto`, `off`, `shared` or `private`.
    pub selinux_label: SelinuxLabel,
    /// Where the runtime keeps its sandboxes' OCI configurations, read for `private` labels:
    /// containerd's `state` directory, CRI-O's storage `runroot`. Unset: the runtime's default
    /// (`/run/containerd`, `/run/containers/storage`).
    pub runtime_state_dir: Option<PathBuf>,
    /// Runtime handlers whose pods run in a VM with a shared file system (Kata Containers
    /// with virtio-fs); a trailing `*` matches a prefix.
    pub vm_runtime_handlers: Vec<String>,
    /// Runtime handlers whose pods run in a VM without a shared file system (files copied in
    /// once at creation); they win over `vm_runtime_handlers`.
    pub copy_once_runtime_handlers: Vec<String>,
    /// How many containers of one pod may hold an identity at once; more are refused at
    /// CreateContainer.
    pub max_identities_per_pod: usize,
    /// How many identities the node may hold at once; keep it below what the daemon's memory
    /// limit holds (about 2,000 in the shipped DaemonSet's 64 MiB).
    pub max_identities: usize,
    /// Give containers served at StartContainer (PID mode) whose pod must not run without its
    /// identity a start guard: an OCI hook the runtime runs before the workload, which waits
    /// until the files are in place whether or not the daemon is alive at that moment.
    pub start_guard: bool,
    /// How long the start guard waits before failing the container's start.
    pub start_guard_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            runtime: None,
            nri_socket: PathBuf::from(nri_plugin::DEFAULT_SOCKET_PATH),
            plugin_name: "identity-injector".into(),
            plugin_index: "10".into(),
            identity_api: IdentityApi::Delegated,
            agent_socket: PathBuf::from("/run/spire/admin/admin.sock"),
            broker_socket: PathBuf::from("/run/spire/broker/broker.sock"),
            workload_api_socket: PathBuf::from("/run/spire/agent-sockets/spire-agent.sock"),
            broker_spiffe_id: None,
            allowed_agent_sockets: Vec::new(),
            artifact_root: PathBuf::from("/run/nri-identity-injector"),
            first_svid_timeout_ms: 1500,
            attestation: None,
            kubelet_url: None,
            kubelet_ca_path: PathBuf::from(SERVICE_ACCOUNT_DIR).join("ca.crt"),
            kubelet_skip_verification: false,
            kubelet_server_name: None,
            kubelet_token_path: PathBuf::from(SERVICE_ACCOUNT_DIR).join("token"),
            kubelet_certificate_path: None,
            kubelet_private_key_path: None,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            http_address: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            drain_timeout_ms: 5000,
            selinux_label: SelinuxLabel::Auto,
            runtime_state_dir: None,
            vm_runtime_handlers: vec!["kata*".into()],
            // Kata's handlers whose default configuration shares no file system with the
            // guest: Firecracker and the confidential-computing guests.
            copy_once_runtime_handlers: [
                "kata-fc*",
                "kata-qemu-tdx*",
                "kata-qemu-snp*",
                "kata-qemu-se*",
                "kata-qemu-coco-dev*",
                "kata-remote*",
            ]
            .map(String::from)
            .to_vec(),
            max_identities_per_pod: IdentityLimits::DEFAULT.per_pod,
            max_identities: IdentityLimits::DEFAULT.total,
            start_guard: true,
            start_guard_timeout_ms: 60_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Load(#[from] Box<figment::Error>),
    #[error("{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

fn invalid(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        problem: problem.into(),
    }
}

impl Config {
    /// Builds the configuration from defaults, an optional TOML file, the environment
    /// (through `env`, so tests need not touch the process environment) and flag overrides.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(invalid(
                    "config",
                    format!("{} does not exist", file.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        let vars: Vec<(String, String)> = env
            .into_iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(ENV_PREFIX)
                    .map(|k| (k.to_ascii_lowercase(), v))
            })
            .collect();
        figment = figment.merge(EnvPairs(vars));
        figment = figment.merge(Serialized::defaults(flags));
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = !self.plugin_name.is_empty()
            && self
                .plugin_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.+-".contains(c));
        if !name_ok {
            return Err(invalid("plugin_name", "use letters, digits and _.+-"));
        }
        if self.plugin_index.len() != 2 || !self.plugin_index.chars().all(|c| c.is_ascii_digit()) {
            return Err(invalid("plugin_index", "must be exactly two digits"));
        }
        for (field, path) in [
            ("nri_socket", &self.nri_socket),
            ("agent_socket", &self.agent_socket),
            ("broker_socket", &self.broker_socket),
            ("workload_api_socket", &self.workload_api_socket),
            ("artifact_root", &self.artifact_root),
        ] {
            if !path.is_absolute() {
                return Err(invalid(
                    field,
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        if self.identity_api == IdentityApi::Broker
            && self.broker_socket == self.workload_api_socket
        {
            return Err(invalid(
                "broker_socket",
                "must differ from workload_api_socket (the agent serves them on separate sockets)",
            ));
        }
        if let Some(id) = &self.broker_spiffe_id
            && let Err(e) = crate::spiffe::SpiffeId::parse(id)
        {
            return Err(invalid("broker_spiffe_id", format!("{id:?}: {e}")));
        }
        if self.artifact_root == Path::new("/") {
            return Err(invalid("artifact_root", "must not be /"));
        }
        if let Some(p) = self.allowed_agent_sockets.iter().find(|p| !p.is_absolute()) {
            return Err(invalid(
                "allowed_agent_sockets",
                format!("{} is not an absolute path", p.display()),
            ));
        }
        if !(50..=10_000).contains(&self.first_svid_timeout_ms) {
            return Err(invalid(
                "first_svid_timeout_ms",
                "must be between 50 and 10000",
            ));
        }
        if !(1_000..=600_000).contains(&self.start_guard_timeout_ms) {
            return Err(invalid(
                "start_guard_timeout_ms",
                "must be between 1000 and 600000",
            ));
        }
        if self.drain_timeout_ms > 120_000 {
            return Err(invalid("drain_timeout_ms", "must be at most 120000"));
        }
        if self.max_identities_per_pod == 0 {
            return Err(invalid("max_identities_per_pod", "must be at least 1"));
        }
        if self.max_identities < self.max_identities_per_pod {
            return Err(invalid(
                "max_identities",
                "must be at least max_identities_per_pod",
            ));
        }
        if let Err(error) = self.log_filter() {
            return Err(invalid(
                "log_level",
                format!("{:?} is not a valid filter: {error}", self.log_level),
            ));
        }
        for (field, path) in [
            ("kubelet_ca_path", Some(&self.kubelet_ca_path)),
            ("kubelet_token_path", Some(&self.kubelet_token_path)),
            (
                "kubelet_certificate_path",
                self.kubelet_certificate_path.as_ref(),
            ),
            (
                "kubelet_private_key_path",
                self.kubelet_private_key_path.as_ref(),
            ),
        ] {
            if let Some(path) = path.filter(|p| !p.is_absolute()) {
                return Err(invalid(
                    field,
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        if self.kubelet_certificate_path.is_some() != self.kubelet_private_key_path.is_some() {
            return Err(invalid(
                "kubelet_certificate_path",
                "set both kubelet_certificate_path and kubelet_private_key_path, or neither",
            ));
        }
        if let Some(name) = &self.kubelet_server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return Err(invalid(
                "kubelet_server_name",
                format!("{name:?} is neither a DNS name nor an IP address"),
            ));
        }
        SandboxClasses::new(&self.vm_runtime_handlers, &[] as &[String])
            .map_err(|e| invalid("vm_runtime_handlers", e))?;
        SandboxClasses::new(&[] as &[String], &self.copy_once_runtime_handlers)
            .map_err(|e| invalid("copy_once_runtime_handlers", e))?;
        if let Some(p) = self.runtime_state_dir.as_ref().filter(|p| !p.is_absolute()) {
            return Err(invalid(
                "runtime_state_dir",
                format!("{} is not an absolute path", p.display()),
            ));
        }
        Ok(())
    }

    /// Which logs are written: a level (`info`) or levels by target
    /// (`nri_identity_injector=debug,info`). Each directive must name a level: a bare word
    /// would be read as a target to log at every level, so a misspelt level would silence the
    /// daemon instead of failing. No regular expressions or span filters: the daemon carries
    /// no regex engine for its log filter.
    pub fn log_filter(&self) -> Result<tracing_subscriber::filter::Targets, String> {
        for directive in self.log_level.split(',').map(str::trim) {
            let (target, level) = match directive.split_once('=') {
                Some((t, l)) => (Some(t), l),
                None => (None, directive),
            };
            if let Some(t) = target
                && (t.is_empty()
                    || !t
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            {
                return Err(format!("{t:?} is not a target (a Rust module path)"));
            }
            if level
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
            {
                return Err(format!(
                    "{level:?} is not a level (off, error, warn, info, debug, trace)"
                ));
            }
        }
        self.log_level
            .parse()
            .map_err(|e: tracing_subscriber::filter::ParseError| e.to_string())
    }

    /// The naming mode for pods that do not choose one: the configured one, else selectors
    /// where the kubelet is known (Kubernetes), else PID.
    pub fn default_attestation(&self) -> Attestation {
        self.attestation.unwrap_or(if self.kubelet_url.is_some() {
            Attestation::Selectors
        } else {
            Attestation::Pid
        })
    }

    /// Which runtime handlers run pods in VMs (validated by [`Config::validate`]).
    pub fn sandbox_classes(&self) -> SandboxClasses {
        SandboxClasses::new(&self.vm_runtime_handlers, &self.copy_once_runtime_handlers)
            .unwrap_or_default()
    }

    /// Where and how to reach the kubelet, if configured.
    pub fn kubelet_endpoint(&self) -> Option<Endpoint> {
        let url = self.kubelet_url.clone()?;
        let tls = (url.scheme == Scheme::Https).then(|| TlsSettings {
            ca: (!self.kubelet_skip_verification).then(|| self.kubelet_ca_path.clone()),
            server_name: self
                .kubelet_server_name
                .clone()
                .unwrap_or_else(|| url.host.clone()),
            auth: match (
                &self.kubelet_certificate_path,
                &self.kubelet_private_key_path,
            ) {
                (Some(cert), Some(key)) => ClientAuth::Certificate {
                    cert: cert.clone(),
                    key: key.clone(),
                },
                _ => ClientAuth::Token(self.kubelet_token_path.clone()),
            },
        });
        Some(Endpoint { url, tls })
    }

    /// How many identities a pod, and the node, may hold at once.
    pub fn identity_limits(&self) -> IdentityLimits {
        IdentityLimits {
            per_pod: self.max_identities_per_pod,
            total: self.max_identities,
        }
    }

    pub fn first_svid_timeout(&self) -> Duration {
        Duration::from_millis(self.first_svid_timeout_ms)
    }

    /// The start guard's timeout, when the guard is on.
    pub fn start_guard(&self) -> Option<Duration> {
        self.start_guard
            .then(|| Duration::from_millis(self.start_guard_timeout_ms))
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    /// The socket of the chosen identity API: the default agent address of every pod.
    pub fn identity_socket(&self) -> &Path {
        match self.identity_api {
            IdentityApi::Delegated => &self.agent_socket,
            IdentityApi::Broker => &self.broker_socket,
        }
    }

    /// The Broker API client's settings, from `workload_api_socket` and `broker_spiffe_id`.
    pub fn broker_config(&self) -> crate::spire::BrokerConfig {
        let mut config = crate::spire::BrokerConfig::new(&self.workload_api_socket);
        // Validated with the rest of the configuration.
        config.spiffe_id = self
            .broker_spiffe_id
            .as_deref()
            .and_then(|id| crate::spiffe::SpiffeId::parse(id).ok());
        config
    }

    /// The annotation policy: which agent sockets pods may name.
    pub fn annotation_policy(&self) -> crate::annotation::Policy {
        self.allowed_agent_sockets.iter().fold(
            crate::annotation::Policy::new(self.identity_socket()),
            |p, a| p.allow_agent_address(a),
        )
    }

    /// Every field's name (the file key; upper-cased with [`ENV_PREFIX`], the environment
    /// variable), sorted, as serde sees the struct.
    pub fn fields() -> Vec<String> {
        figment::value::Value::serialize(Config::default())
            .ok()
            .and_then(|v| v.into_dict())
            .map(|dict| dict.into_keys().collect())
            .unwrap_or_default()
    }

    /// The configuration as a TOML document, e.g. for `config` output.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let value =
            figment::value::Value::serialize(self).unwrap_or(figment::value::Value::from(0));
        if let Some(dict) = value.into_dict() {
            for (k, v) in dict {
                if matches!(v, figment::value::Value::Empty(..)) {
                    continue;
                }
                out.push_str(&format!("{k} = {}\n", toml_value(&v)));
            }
        }
        out
    }
}

fn toml_value(v: &figment::value::Value) -> String {
    use figment::value::Value;
    match v {
        Value::String(_, s) => toml_string(s),
        Value::Num(_, n) => n
            .to_u128()
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("{n:?}")),
        Value::Bool(_, b) => b.to_string(),
        Value::Array(_, a) => format!(
            "[{}]",
            a.iter().map(toml_value).collect::<Vec<_>>().join(", ")
        ),
        other => format!("{other:?}"),
    }
}

/// A TOML basic string. Not Rust's `{:?}`: its `\u{1b}` escapes are not TOML, so a printed
/// configuration holding a control character would not load back.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The command-line flags of `run` and `config`. Each overrides the configuration field of its
/// name (the flag's spelling with `_` for `-`); an unset flag leaves lower sources alone.
#[derive(Debug, Clone, Default, Serialize, clap::Args)]
pub struct Overrides {
    /// The runtime to serve; any other is refused [default: whichever connects]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeKind>,
    /// The runtime's NRI socket [default: /var/run/nri/nri.sock]
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nri_socket: Option<PathBuf>,
    /// The SPIRE agent's admin socket (Delegated Identity API) [default: /run/spire/admin/admin.sock]
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_socket: Option<PathBuf>,
    /// Which agent API serves workload identities [default: delegated]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_api: Option<IdentityApi>,
    /// Host directory of the per-container identity directories [default: /run/nri-identity-injector]
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_root: Option<PathBuf>,
    /// The NRI plugin index, two digits [default: 10]
    #[arg(long, value_name = "NN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_index: Option<String>,
    /// Where /healthz, /readyz and /metrics are served [default: 127.0.0.1:9464]
    #[arg(long, value_name = "IP:PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_address: Option<SocketAddr>,
    /// Log line format [default: text]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// A tracing filter such as `info` or `nri_identity_injector=debug,info` [default: info]
    #[arg(long, value_name = "FILTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// How workloads are named when the pod does not say [default: selectors with a kubelet, else pid]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attestation: Option<Attestation>,
    /// The kubelet for selectors mode: https://<node-ip>:10250 or http://127.0.0.1:10255
    #[arg(long, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubelet_url: Option<KubeletUrl>,
    /// SELinux label of the identity files [default: auto]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selinux_label: Option<SelinuxLabel>,
}

/// Environment pairs as a figment provider, parsed like figment's own `Env` (so lists and
/// numbers work) but from a given set rather than the process environment.
struct EnvPairs(Vec<(String, String)>);

impl EnvPairs {
    /// Whether `field` takes `value` as a string as it is (a path, a name, "09" as a plugin
    /// index), decided by the field's own type rather than a list kept by hand: the value is
    /// tried as a string on the defaults.
    fn takes_string(field: &str, value: &str) -> bool {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Serialized::default(field, value))
            .extract::<Config>()
            .is_ok()
    }
}

impl figment::Provider for EnvPairs {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("environment")
            .interpolater(|_, k| format!("{ENV_PREFIX}{}", k.join("_").to_ascii_uppercase()))
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let mut dict = figment::value::Dict::new();
        for (k, v) in &self.0 {
            // String fields stay strings ("09" is an index, not the number 9); the rest
            // parse as figment's own Env provider would (numbers, lists).
            let value = if Self::takes_string(k, v) {
                figment::value::Value::from(v.clone())
            } else if v.contains('\\') && !v.is_ascii() {
                // figment 0.10's value parser slices a quoted string at a character index
                // where it needs a byte index, and panics when non-ASCII text precedes a
                // backslash (found by the `config` fuzz target). Refuse instead of crashing.
                return Err(figment::Error::from(format!(
                    "{ENV_PREFIX}{}: a value with both backslashes and non-ASCII characters \
                     cannot be read; write it in the configuration file",
                    k.to_ascii_uppercase()
                )));
            } else {
                v.parse()
                    .unwrap_or_else(|_| figment::value::Value::from(v.clone()))
            };
            dict.insert(k.clone(), value);
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write(name: &str, body: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("nii-config-{}-{name}.toml", std::process::id()));
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, vec![], &Overrides::default()).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn precedence_is_defaults_then_file_then_env_then_flags() {
        let f = write(
            "prec",
            "agent_socket = \"/file.sock\"\nplugin_index = \"20\"\nlog_level = \"debug\"\n",
        );
        let e = env(&[
            ("NRI_IDENTITY_PLUGIN_INDEX", "09"),
            ("NRI_IDENTITY_LOG_LEVEL", "warn"),
            ("OTHER", "x"),
        ]);
        let flags = Overrides {
            log_level: Some("error".into()),
            ..Default::default()
        };
        let c = Config::load(Some(&f), e, &flags).unwrap();
        assert_eq!(
            c.agent_socket,
            PathBuf::from("/file.sock"),
            "file over defaults"
        );
        assert_eq!(c.plugin_index, "09", "env over file");
        assert_eq!(c.log_level, "error", "flags over env");
    }

    #[test]
    fn the_broker_api_is_chosen_by_identity_api_and_checked() {
        let f = write(
            "broker",
            "identity_api = \"broker\"\nbroker_socket = \"/run/spire/broker.sock\"\n\
             workload_api_socket = \"/run/spire/api.sock\"\n\
             broker_spiffe_id = \"spiffe://example.org/nii\"\n",
        );
        let c = Config::load(Some(&f), env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.identity_api, IdentityApi::Broker);
        assert_eq!(c.identity_socket(), Path::new("/run/spire/broker.sock"));
        assert_eq!(
            c.annotation_policy().default_agent_address(),
            Path::new("/run/spire/broker.sock"),
            "pods default to the broker endpoint"
        );
        let broker = c.broker_config();
        assert_eq!(broker.workload_api, Path::new("/run/spire/api.sock"));
        assert_eq!(
            broker.spiffe_id.map(|id| id.as_str().to_owned()).as_deref(),
            Some("spiffe://example.org/nii")
        );
        assert_eq!(
            Config::default().identity_socket(),
            Config::default().agent_socket,
            "delegated is the default"
        );

        for (body, field) in [
            (
                "identity_api = \"broker\"\nbroker_socket = \"/a.sock\"\nworkload_api_socket = \"/a.sock\"\n",
                "broker_socket",
            ),
            ("broker_socket = \"rel.sock\"", "broker_socket"),
            ("workload_api_socket = \"rel.sock\"", "workload_api_socket"),
            ("broker_spiffe_id = \"not-an-id\"", "broker_spiffe_id"),
        ] {
            let f = write("broker-bad", body);
            let err = Config::load(Some(&f), env(&[]), &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(field), "{body}: {err}");
        }
        let err = Config::load(
            None,
            env(&[("NRI_IDENTITY_IDENTITY_API", "workload")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("IDENTITY_API"), "{err}");
    }

    #[test]
    fn env_lists_and_numbers_parse() {
        let e = env(&[
            (
                "NRI_IDENTITY_ALLOWED_AGENT_SOCKETS",
                "[\"/a.sock\", \"/b.sock\"]",
            ),
            ("NRI_IDENTITY_FIRST_SVID_TIMEOUT_MS", "900"),
        ]);
        let c = Config::load(None, e, &Overrides::default()).unwrap();
        assert_eq!(
            c.allowed_agent_sockets,
            vec![PathBuf::from("/a.sock"), PathBuf::from("/b.sock")]
        );
        assert_eq!(c.first_svid_timeout(), Duration::from_millis(900));
    }

    #[test]
    fn log_levels_alone_or_by_target_are_accepted() {
        for level in [
            "info",
            "OFF",
            "nri_identity_injector=debug,nri_plugin=info,info",
            "nri_identity_injector::engine=trace, warn",
        ] {
            let c = Config {
                log_level: level.into(),
                ..Config::default()
            };
            assert!(c.log_filter().is_ok(), "{level}");
        }
    }

    #[test]
    fn bad_configuration_is_refused_with_the_field_named() {
        let cases: &[(&str, &str)] = &[
            ("plugin_index = \"1\"", "plugin_index"),
            ("plugin_name = \"a b\"", "plugin_name"),
            ("agent_socket = \"relative.sock\"", "agent_socket"),
            ("artifact_root = \"/\"", "artifact_root"),
            ("first_svid_timeout_ms = 5", "first_svid_timeout_ms"),
            ("log_level = \"[\"", "log_level"),
            ("log_level = \"infoo\"", "log_level"),
            ("log_level = \"nri_identity_injector\"", "log_level"),
            ("log_level = \"a b=debug\"", "log_level"),
            ("no_such_key = 1", "no_such_key"),
            ("first_svid_timeout_ms = \"soon\"", "first_svid_timeout_ms"),
            ("runtime = \"docker\"", "runtime"),
            ("selinux_label = \"mine\"", "selinux_label"),
            ("runtime_state_dir = \"run/crio\"", "runtime_state_dir"),
            ("max_identities_per_pod = 0", "max_identities_per_pod"),
            (
                "max_identities = 5\nmax_identities_per_pod = 6",
                "max_identities",
            ),
            ("max_identities = -1", "max_identities"),
            ("start_guard_timeout_ms = 10", "start_guard_timeout_ms"),
        ];
        for (body, field) in cases {
            let f = write("bad", body);
            let err = Config::load(Some(&f), vec![], &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{body}: {err}");
        }
    }

    #[test]
    fn identity_limits_come_from_the_file_and_the_environment() {
        assert_eq!(Config::default().identity_limits(), IdentityLimits::DEFAULT);
        let f = write("limits", "max_identities = 500\nmax_identities_per_pod = 4");
        let c = Config::load(
            Some(&f),
            env(&[("NRI_IDENTITY_MAX_IDENTITIES_PER_POD", "8")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.identity_limits(),
            IdentityLimits {
                per_pod: 8,
                total: 500
            }
        );
    }

    #[test]
    fn a_kubelet_url_makes_selectors_the_default_unless_told_otherwise() {
        let c = Config {
            kubelet_url: Some("http://127.0.0.1:10255".parse().unwrap()),
            ..Config::default()
        };
        assert_eq!(c.default_attestation(), Attestation::Selectors);
        let c = Config {
            attestation: Some(Attestation::Pid),
            ..c
        };
        assert_eq!(c.default_attestation(), Attestation::Pid);
        assert_eq!(Config::default().default_attestation(), Attestation::Pid);
    }

    #[test]
    fn the_secure_port_defaults_to_the_service_account_token_and_cluster_ca() {
        let env = vec![(
            "NRI_IDENTITY_KUBELET_URL".to_owned(),
            "https://10.1.2.3".to_owned(),
        )];
        let c = Config::load(None, env, &Overrides::default()).unwrap();
        let e = c.kubelet_endpoint().unwrap();
        assert_eq!(e.url.to_string(), "https://10.1.2.3:10250");
        assert_eq!(
            e.tls,
            Some(TlsSettings {
                ca: Some("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt".into()),
                server_name: "10.1.2.3".into(),
                auth: ClientAuth::Token(
                    "/var/run/secrets/kubernetes.io/serviceaccount/token".into()
                ),
            })
        );
        let read_only = Config {
            kubelet_url: Some("http://127.0.0.1:10255".parse().unwrap()),
            ..Config::default()
        };
        assert_eq!(read_only.kubelet_endpoint().unwrap().tls, None);
    }

    #[test]
    fn client_certificates_skipped_verification_and_a_server_name_are_honoured() {
        let f = write(
            "kubelet",
            r#"
kubelet_url = "https://node-1:10250"
kubelet_skip_verification = true
kubelet_server_name = "node-1.cluster.example"
kubelet_certificate_path = "/etc/nii/client.pem"
kubelet_private_key_path = "/etc/nii/client-key.pem"
"#,
        );
        let c = Config::load(Some(&f), vec![], &Overrides::default()).unwrap();
        let tls = c.kubelet_endpoint().unwrap().tls.unwrap();
        assert_eq!(tls.ca, None);
        assert_eq!(tls.server_name, "node-1.cluster.example");
        assert_eq!(
            tls.auth,
            ClientAuth::Certificate {
                cert: "/etc/nii/client.pem".into(),
                key: "/etc/nii/client-key.pem".into()
            }
        );
    }

    #[test]
    fn bad_kubelet_settings_name_their_field() {
        let cases = [
            ("kubelet_url = \"127.0.0.1:10255\"", "kubelet_url"),
            ("kubelet_url = \"https://h/pods\"", "kubelet_url"),
            (
                "kubelet_certificate_path = \"/c.pem\"",
                "kubelet_certificate_path",
            ),
            ("kubelet_token_path = \"token\"", "kubelet_token_path"),
            ("kubelet_server_name = \"a b\"", "kubelet_server_name"),
        ];
        for (body, field) in cases {
            let f = write("badkubelet", body);
            let err = Config::load(Some(&f), vec![], &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{body}: {err}");
        }
    }

    #[test]
    fn private_labels_are_accepted_with_the_runtimes_state_directory() {
        let f = write(
            "private",
            "runtime = \"cri-o\"\nselinux_label = \"private\"\nruntime_state_dir = \"/var/run/containers/storage\"\n",
        );
        let c = Config::load(Some(&f), vec![], &Overrides::default()).unwrap();
        assert_eq!(c.selinux_label, SelinuxLabel::Private);
        assert_eq!(
            c.runtime_state_dir.as_deref(),
            Some(Path::new("/var/run/containers/storage"))
        );
        let env = vec![(
            "NRI_IDENTITY_SELINUX_LABEL".to_owned(),
            "private".to_owned(),
        )];
        let c = Config::load(None, env, &Overrides::default()).unwrap();
        assert_eq!(
            (c.selinux_label, c.runtime_state_dir),
            (SelinuxLabel::Private, None)
        );
    }

    #[test]
    fn the_start_guard_is_on_by_default_and_can_be_turned_off() {
        assert_eq!(
            Config::default().start_guard(),
            Some(Duration::from_secs(60))
        );
        let e = env(&[
            ("NRI_IDENTITY_START_GUARD", "false"),
            ("NRI_IDENTITY_START_GUARD_TIMEOUT_MS", "5000"),
        ]);
        let c = Config::load(None, e, &Overrides::default()).unwrap();
        assert_eq!(c.start_guard(), None);
        assert_eq!(c.start_guard_timeout_ms, 5000);
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let err = Config::load(
            Some(Path::new("/nonexistent/x.toml")),
            vec![],
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn the_annotation_policy_allows_the_configured_sockets_only() {
        let c = Config {
            allowed_agent_sockets: vec!["/other.sock".into()],
            ..Config::default()
        };
        let p = c.annotation_policy();
        assert_eq!(
            p.default_agent_address(),
            Path::new("/run/spire/admin/admin.sock")
        );
        assert_eq!(p.allowed_agent_addresses().len(), 2);
    }

    #[test]
    fn printed_strings_with_control_characters_quotes_and_unicode_load_back() {
        // Found by the `config` fuzz target: `{:?}` printed "\u{e}", which TOML refuses.
        let c = Config {
            allowed_agent_sockets: vec![
                PathBuf::from("/run/a\u{e}sock"),
                PathBuf::from("/run/\"quoted\" \\ back\tslash\n\u{7f}\u{85}"),
                PathBuf::from("/run/é/\u{200b}/✓.sock"),
            ],
            ..Config::default()
        };
        c.validate().unwrap();
        let rendered = c.to_toml();
        let f = write("escapes", &rendered);
        let again = Config::load(Some(&f), vec![], &Overrides::default()).unwrap();
        assert_eq!(again, c, "{rendered}");
    }

    #[test]
    fn environment_values_that_crash_figments_parser_are_refused_not_a_panic() {
        // Found by the `config` fuzz target (reduced): figment's value parser panicked on
        // non-ASCII text before a backslash in a quoted string.
        for value in [
            r#"["/run/é\u00e9"]"#,
            r#""é\"""#,
            "[\"/ruo/\u{fffd}ri-i\\u00&0\"]",
        ] {
            let err = Config::load(
                None,
                env(&[("NRI_IDENTITY_ALLOWED_AGENT_SOCKETS", value)]),
                &Overrides::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("NRI_IDENTITY_ALLOWED_AGENT_SOCKETS"),
                "{value}: {err}"
            );
        }
        // Backslashes alone, or non-ASCII alone, still parse.
        for (value, expected) in [
            (r#"["/run/a\\b.sock"]"#, "/run/a\\b.sock"),
            ("[/run/é.sock]", "/run/é.sock"),
        ] {
            let c = Config::load(
                None,
                env(&[("NRI_IDENTITY_ALLOWED_AGENT_SOCKETS", value)]),
                &Overrides::default(),
            )
            .unwrap();
            assert_eq!(c.allowed_agent_sockets, [PathBuf::from(expected)]);
        }
    }

    #[test]
    fn environment_values_take_each_fields_own_type() {
        let e = env(&[
            ("NRI_IDENTITY_PLUGIN_INDEX", "09"),
            ("NRI_IDENTITY_PLUGIN_NAME", "42"),
            ("NRI_IDENTITY_RUNTIME", "crio"),
            ("NRI_IDENTITY_KUBELET_SKIP_VERIFICATION", "true"),
            ("NRI_IDENTITY_HTTP_ADDRESS", "0.0.0.0:9000"),
            ("NRI_IDENTITY_DRAIN_TIMEOUT_MS", "250"),
            ("NRI_IDENTITY_VM_RUNTIME_HANDLERS", "[\"kata-qemu\"]"),
        ]);
        let c = Config::load(None, e, &Overrides::default()).unwrap();
        assert_eq!(c.plugin_index, "09", "a string stays a string");
        assert_eq!(
            c.plugin_name, "42",
            "digits in a string field stay a string"
        );
        assert_eq!(c.runtime, Some(RuntimeKind::CriO));
        assert!(c.kubelet_skip_verification);
        assert_eq!(c.http_address, Some(SocketAddr::from(([0, 0, 0, 0], 9000))));
        assert_eq!(c.drain_timeout(), Duration::from_millis(250));
        assert_eq!(c.vm_runtime_handlers, vec!["kata-qemu".to_owned()]);
    }

    #[test]
    fn the_readme_configuration_table_lists_exactly_the_fields() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"));
        let section = readme
            .split("\n## Configuration\n")
            .nth(1)
            .expect("README has a Configuration section");
        let section = section.split("\n## ").next().unwrap_or(section);
        let mut listed: Vec<String> = section
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|row| row.split(" |").next())
            .flat_map(|cell| {
                cell.split('`')
                    .filter(|s| !s.is_empty() && !s.starts_with(','))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        listed.sort();
        assert_eq!(listed, Config::fields());
    }

    #[test]
    fn rendered_defaults_load_back_to_the_same_configuration() {
        let rendered = Config::default().to_toml();
        let f = write("roundtrip", &rendered);
        let c = Config::load(Some(&f), vec![], &Overrides::default()).unwrap();
        assert_eq!(c, Config::default(), "{rendered}");
    }
}
