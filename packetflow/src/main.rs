//! The `packetflow` binary: parses the command line (`cmd/cli.rs`) and dispatches to
//! `cmd/`, one file per subcommand; turns errors into one line and an exit code
//! (`error::report`).

use clap::Parser;
use packetflow::{
    cmd::cli::{Cli, dispatch},
    error,
};

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
