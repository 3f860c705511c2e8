//! The command line: every subcommand and its flags, parsed by clap. `main.rs` parses and
//! calls `dispatch`; completions and man pages are generated from this same definition
//! (`cmd/docs.rs`).

use clap::{Parser, Subcommand};

use super::{bench, blast, capture, daemon, demo, docs, doctor, report, seed, status, trace};

#[derive(Parser)]
#[command(
    name = "packetflow",
    version,
    about = "Where a packet's time goes inside Linux: per-stage latency from send syscall to receive syscall, measured with eBPF."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Check what this kernel lets packetflow do (by trying), and say what is missing.
    Doctor(doctor::Args),
    #[command(after_help = trace::EXAMPLES)]
    Trace(trace::Args),
    #[command(after_help = capture::EXAMPLES)]
    Capture(capture::Args),
    Blast(blast::Args),
    Daemon(daemon::Args),
    Status(status::Args),
    #[command(after_help = demo::EXAMPLES)]
    Demo(demo::DemoArgs),
    #[command(after_help = report::EXAMPLES)]
    Report(report::Args),
    Bench(bench::BenchArgs),
    Serve(seed::ServeOpts),
    Client(seed::ClientOpts),
    Completions(docs::CompletionArgs),
    Man(docs::ManArgs),
}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    if !matches!(cli.cmd, Cmd::Daemon(_)) {
        // `packetflow capture | head`: a closed pipe ends the command quietly, as it does
        // tcpdump, instead of failing a print (Rust ignores SIGPIPE by default). The
        // daemon keeps it ignored: a scraper hanging up must never stop it.
        // SAFETY: signal(2) with SIG_DFL touches no memory; called before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let rt = super::runtime;
    match cli.cmd {
        Cmd::Doctor(a) => rt()?.block_on(doctor::run(a)),
        Cmd::Trace(a) => rt()?.block_on(trace::run(a)),
        Cmd::Capture(a) => rt()?.block_on(capture::run(a)),
        Cmd::Blast(a) => blast::run(a),
        Cmd::Daemon(a) => rt()?.block_on(daemon::run(a)),
        Cmd::Status(a) => status::run(&a),
        Cmd::Demo(a) => rt()?.block_on(demo::run(a)),
        Cmd::Report(a) => report::run(a),
        Cmd::Bench(a) => rt()?.block_on(bench::run(a)),
        Cmd::Serve(a) => seed::serve(&a),
        Cmd::Client(a) => seed::client(&a).map(|_| ()),
        Cmd::Completions(a) => docs::completions(&a),
        Cmd::Man(a) => docs::man(&a),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every flag and argument of every subcommand says what it does.
    #[test]
    fn every_flag_has_help() {
        let mut missing = Vec::new();
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            for a in sub.get_arguments() {
                let id = a.get_id().as_str();
                if id != "help" && id != "version" && a.get_help().is_none() && !a.is_hide_set() {
                    missing.push(format!("{} {id}", sub.get_name()));
                }
            }
            assert!(sub.get_about().is_some(), "{} has no description", sub.get_name());
            if ["trace", "capture", "demo", "report"].contains(&sub.get_name()) {
                let examples = sub.get_after_help().map(ToString::to_string).unwrap_or_default();
                assert!(examples.matches("packetflow ").count() >= 2, "{} --help has no examples", sub.get_name());
            }
        }
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
