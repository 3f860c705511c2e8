//! `packetflow completions SHELL` and `packetflow man DIR`: shell completions and man
//! pages, generated from the clap definition (`cmd/cli.rs`), so they never disagree with
//! the flags. `cargo xtask dist` puts both into the packages.

use std::path::PathBuf;

use anyhow::Result;
use clap::CommandFactory;

use super::cli::Cli;
use crate::error::user;

/// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
#[derive(clap::Args)]
pub struct CompletionArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Write man pages: packetflow.1 and packetflow-SUBCOMMAND.1 for each subcommand.
#[derive(clap::Args)]
pub struct ManArgs {
    /// Directory to write the pages into (created if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

pub fn completions(a: &CompletionArgs) -> Result<()> {
    clap_complete::generate(a.shell, &mut Cli::command(), "packetflow", &mut std::io::stdout());
    Ok(())
}

pub fn man(a: &ManArgs) -> Result<()> {
    std::fs::create_dir_all(&a.dir).map_err(|e| user(format!("cannot create {}: {e}", a.dir.display())))?;
    let mut cli = Cli::command();
    cli.build();
    let write = |name: String, cmd: clap::Command| -> Result<()> {
        let path = a.dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd.name(name)).render(&mut out)?;
        std::fs::write(&path, out).map_err(|e| user(format!("cannot write {}: {e}", path.display())))?;
        Ok(())
    };
    for sub in cli.get_subcommands().filter(|s| s.get_name() != "help") {
        write(format!("packetflow-{}", sub.get_name()), sub.clone())?;
    }
    write("packetflow".into(), cli)?;
    Ok(())
}
