//! nri-identity-injector: delivers SPIFFE identities into annotated containers through NRI.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nri_identity_injector::annotation;
use nri_identity_injector::config::{Config, LogFormat, Overrides};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::Targets;

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
        #[arg(long, default_value_os_t = Config::default().agent_socket)]
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

/// Sources merge as defaults < file < environment (`NRI_IDENTITY_<FIELD>`) < flags.
#[derive(clap::Args)]
struct RunArgs {
    /// TOML configuration file (every field; see `config` for the effective values)
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Overrides,
}

impl RunArgs {
    fn load(&self) -> Result<Config, nri_identity_injector::config::ConfigError> {
        Config::load(self.config.as_deref(), std::env::vars(), &self.flags)
    }
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // Validated with the rest of the configuration, so the default is never used in practice.
    let filter = config
        .log_filter()
        .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Json => registry
            .with(fmt.json().flatten_event(true).with_current_span(true))
            .init(),
        LogFormat::Text => registry
            .with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_run_and_config_flag_explains_itself_in_one_line() {
        let cli = Cli::command();
        for name in ["run", "config"] {
            let command = cli.find_subcommand(name).unwrap();
            for arg in command.get_arguments() {
                if matches!(arg.get_id().as_str(), "help" | "version") {
                    continue;
                }
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                assert!(
                    !help.is_empty() && !help.contains('\n'),
                    "{name} --{}: {help:?}",
                    arg.get_id()
                );
            }
        }
    }

    #[test]
    fn every_flag_overrides_the_field_of_its_name_and_states_its_default() {
        let fields = Config::fields();
        let defaults = Config::default().to_toml();
        let cli = Cli::command();
        let run = cli.find_subcommand("run").unwrap();
        for arg in run.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version" | "config") {
                continue;
            }
            assert!(fields.iter().any(|f| f == id), "--{id} is no field");
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            // A default that is a value (not prose like "whichever connects") is the one
            // the configuration has.
            let Some(stated) = help
                .split_once("[default: ")
                .and_then(|(_, d)| d.strip_suffix(']'))
            else {
                continue;
            };
            let rendered = defaults
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{id} = ")))
                .map(|v| v.trim_matches('"'));
            if let Some(rendered) = rendered {
                assert_eq!(stated, rendered, "--{id}");
            }
        }
    }

    #[test]
    fn typed_flags_reach_the_configuration() {
        let cli = Cli::try_parse_from([
            "nri-identity-injector",
            "config",
            "--runtime",
            "cri-o",
            "--log-format",
            "json",
            "--attestation",
            "selectors",
            "--selinux-label",
            "shared",
            "--plugin-index",
            "09",
        ])
        .unwrap();
        let Command::Config(args) = cli.command else {
            panic!("not the config command");
        };
        let c = Config::load(None, Vec::new(), &args.flags).unwrap();
        use nri_identity_backends::RuntimeKind;
        use nri_identity_injector::config::{Attestation, SelinuxLabel};
        assert_eq!(c.runtime, Some(RuntimeKind::CriO));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.attestation, Some(Attestation::Selectors));
        assert_eq!(c.selinux_label, SelinuxLabel::Shared);
        assert_eq!(c.plugin_index, "09");
        for bad in [
            ["--runtime", "docker"],
            ["--selinux-label", "mls"],
            ["--log-format", "xml"],
        ] {
            let mut argv = vec!["nri-identity-injector", "config"];
            argv.extend(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }
}
