//! nri-identity-injector: delivers SPIFFE identities into annotated containers through NRI.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nri_identity_injector::annotation;
use nri_identity_injector::config::{Attestation, Config, LogFormat, Overrides};
use tokio_util::sync::CancellationToken;

/// sysexits EX_USAGE / EX_CONFIG.
const EXIT_USAGE: u8 = 64;
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    version,
    about = "Gives annotated containers their SPIFFE identity through NRI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run(RunArgs),
    /// Validate an annotation value offline and print what would be delivered where.
    Check {
        /// A file with the annotation value, or `-` for standard input.
        file: PathBuf,
        /// The agent socket the daemon would allow (its `agent_socket`).
        #[arg(long, default_value = "/run/spire/admin/admin.sock")]
        agent_socket: PathBuf,
        /// Further allowed agent sockets.
        #[arg(long = "allow-agent-socket")]
        allowed: Vec<PathBuf>,
    },
    /// Print the effective configuration (defaults < file < environment < flags) and exit.
    Config(RunArgs),
    /// The start guard, run by the container runtime as an OCI startContainer hook inside a
    /// container: waits until the container's identity files are in place, or fails the start.
    #[command(hide = true)]
    Guard(nri_identity_injector::guard::GuardSpec),
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    nri_socket: Option<PathBuf>,
    #[arg(long)]
    agent_socket: Option<PathBuf>,
    #[arg(long)]
    artifact_root: Option<PathBuf>,
    #[arg(long)]
    plugin_index: Option<String>,
    #[arg(long)]
    http_address: Option<std::net::SocketAddr>,
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[arg(long)]
    log_level: Option<String>,
    #[arg(long, value_parser = ["pid", "selectors"])]
    attestation: Option<String>,
    /// The kubelet, for selectors mode: https://<node-ip>:10250 (secure port; see the
    /// kubelet_* settings for its credentials) or http://127.0.0.1:10255 (read-only port).
    #[arg(long)]
    kubelet_url: Option<nri_identity_injector::k8s::KubeletUrl>,
}

impl RunArgs {
    fn load(&self) -> Result<Config, nri_identity_injector::config::ConfigError> {
        let flags = Overrides {
            nri_socket: self.nri_socket.clone(),
            agent_socket: self.agent_socket.clone(),
            artifact_root: self.artifact_root.clone(),
            plugin_index: self.plugin_index.clone(),
            http_address: self.http_address,
            log_format: self.log_format.as_deref().map(|f| {
                if f == "json" {
                    LogFormat::Json
                } else {
                    LogFormat::Text
                }
            }),
            log_level: self.log_level.clone(),
            attestation: self.attestation.as_deref().map(|a| {
                if a == "pid" {
                    Attestation::Pid
                } else {
                    Attestation::Selectors
                }
            }),
            kubelet_url: self.kubelet_url.clone(),
        };
        Config::load(self.config.as_deref(), std::env::vars(), &flags)
    }
}

fn init_tracing(config: &Config) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Guard(spec) => {
            if nri_identity_injector::guard::run(&spec) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Check {
            file,
            agent_socket,
            allowed,
        } => check(&file, agent_socket, allowed),
        Command::Config(args) => match args.load() {
            Ok(c) => {
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nri-identity-injector: invalid configuration: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run(args) => {
            let config = match args.load() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("nri-identity-injector: invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            // Credentials are files: a daemon that could never authenticate to the kubelet
            // stops here, naming the file, rather than failing every pod later.
            if let Some(Err(e)) = config.kubelet_endpoint().map(|e| e.check()) {
                eprintln!("nri-identity-injector: invalid configuration: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                // The runtime that connected is not the configured one: a configuration
                // problem, not a crash to restart from.
                Err(e)
                    if matches!(
                        e.downcast_ref::<nri_identity_injector::daemon::DaemonError>(),
                        Some(nri_identity_injector::daemon::DaemonError::Runtime(_))
                    ) =>
                {
                    eprintln!("nri-identity-injector: {e:#}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(e) => {
                    eprintln!("nri-identity-injector: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    init_tracing(&config);
    raise_fd_limit();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), runtime = ?config.runtime, nri_socket = %config.nri_socket.display(),
        agent_socket = %config.agent_socket.display(), artifact_root = %config.artifact_root.display(), "starting");
    // Two workers: the daemon's work is small and bursty (one event at a time per runtime,
    // plus streams), and fewer threads keep the resident set small.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("building the async runtime")?;
    runtime.block_on(nri_identity_injector::daemon::run(
        config,
        CancellationToken::new(),
    ))?;
    Ok(())
}

/// Each live identity holds a pidfd (and its watcher's duplicate) and a directory fd: lift
/// the soft limit to the hard one, as systemd's 1024 default would stop at ~340 containers.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let before = limit.current;
        limit.current = limit.maximum;
        match setrlimit(Resource::Nofile, limit) {
            Ok(()) => {
                tracing::debug!(?before, after = ?limit.current, "raised the open-file limit")
            }
            Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
        }
    }
}

fn check(file: &PathBuf, agent_socket: PathBuf, allowed: Vec<PathBuf>) -> ExitCode {
    let mut value = String::new();
    let read = if file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut value).map(|_| ())
    } else {
        std::fs::read_to_string(file).map(|v| value = v)
    };
    if let Err(e) = read {
        eprintln!("cannot read {}: {e}", file.display());
        return ExitCode::from(EXIT_USAGE);
    }
    let policy = allowed
        .into_iter()
        .fold(annotation::Policy::new(agent_socket), |p, a| {
            p.allow_agent_address(a)
        });
    match annotation::parse(&value, &policy) {
        Ok(request) => {
            println!("{}", request.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("invalid annotation: {e}");
            ExitCode::FAILURE
        }
    }
}
