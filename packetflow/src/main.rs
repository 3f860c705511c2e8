//! The `packetflow` binary: parses the command line and dispatches to `cmd/`, one file
//! per subcommand; turns errors into one line and an exit code (`error::report`).

use clap::{Parser, Subcommand};
use packetflow::{
    cmd::{self, bench, blast, capture, daemon, demo, doctor, report, seed, status, trace},
    error,
};

#[derive(Parser)]
#[command(
    name = "packetflow",
    version,
    about = "Where a packet's time goes inside Linux: per-stage latency from send syscall to receive syscall, measured with eBPF."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check what this kernel lets packetflow do (by trying), and say what is missing.
    Doctor,
    Trace(trace::Args),
    Capture(capture::Args),
    Blast(blast::Args),
    Daemon(daemon::Args),
    Status(status::Args),
    Demo(demo::DemoArgs),
    Report(report::Args),
    Bench(bench::BenchArgs),
    Serve(seed::ServeOpts),
    Client(seed::ClientOpts),
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let rt = cmd::runtime;
    match cli.cmd {
        Cmd::Doctor => rt()?.block_on(doctor::run()),
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
    }
}

fn main() {
    // No panic message or backtrace reaches a user: one line, exit 1.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(std::string::ToString::to_string)
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("packetflow: internal error{at}: {msg} (please report this)");
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // --help and --version print in full (and the help when no subcommand is given);
        // a usage error is one line, exit 2.
        Err(e) if !e.use_stderr() || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { 2 } else { 0 });
        }
        Err(e) => {
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or_default();
            eprintln!("packetflow: {}", line.strip_prefix("error: ").unwrap_or(line));
            std::process::exit(2);
        }
    };
    let code = match std::panic::catch_unwind(|| dispatch(cli)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            let (code, line) = error::report(&e);
            eprintln!("packetflow: {line}");
            code
        }
        Err(_) => 1,
    };
    std::process::exit(code);
}
