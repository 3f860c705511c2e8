//! Opening the files packetflow writes, in one place.
//!
//! packetflow often runs as root, in directories others can write to (`/tmp`). So:
//!
//! - a symbolic link is never followed (`O_NOFOLLOW`): an output path that is a symlink
//!   is refused with one sentence (exit 2), so nobody can point root's output at
//!   `/etc/shadow`;
//! - new files get mode 0640 ([`MODE`], less the umask): packet contents and process
//!   names are not for every local user;
//! - a user-named output (`-w FILE`, `--json`, `--chrome-trace`, `--html`, `--svg DIR`'s
//!   files) that exists as a regular file is overwritten, as `tcpdump -w` does (its mode
//!   is kept); `-` is stdout;
//! - the daemon's trace files are only ever new files (`O_EXCL`), in a `trace_dir` that is
//!   not itself a symlink, named so that no two can repeat (`trace_files::file_name`).

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use anyhow::Result;

use crate::error::user;

/// Mode of every file packetflow creates (before the umask).
pub const MODE: u32 = 0o640;

/// Opens a user-named output for writing: `-` is stdout, anything else [`create`]d.
pub fn writer(path: &str) -> Result<Box<dyn Write + Send>> {
    if path == "-" {
        return Ok(Box::new(BufWriter::new(std::io::stdout())));
    }
    Ok(Box::new(BufWriter::new(create(Path::new(path))?)))
}

/// Creates `path`, or truncates the file already there, without following a symlink.
pub fn create(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| refused(path, e))
}

/// Creates `path`, which must not exist yet (a trace file).
pub fn create_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Creates the directory `dir` (and its parents) when missing; refuses a `dir` that is a
/// symlink or not a directory.
pub fn ensure_dir(dir: &Path, what: &str) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(user(format!(
            "refusing to use {what} {}: it is a symbolic link (name the directory it points to)",
            dir.display()
        ))),
        Ok(m) if !m.is_dir() => Err(user(format!("{what} {} is not a directory", dir.display()))),
        Ok(_) => Ok(()),
        Err(_) => {
            std::fs::create_dir_all(dir).map_err(|e| user(format!("cannot create {what} {}: {e}", dir.display())))
        }
    }
}

/// `s` safe to print on a terminal: control characters (ESC, CR, BEL, C1 controls...)
/// become escapes (`\x1b`, `\u{9b}`), so a process name, which any process may set to
/// anything, cannot move the cursor or retitle the window. JSON output needs no such
/// help: serde escapes control characters itself.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if (c as u32) < 0x80 && c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.into()
}

/// The user's sentence for a failed open of `path`.
fn refused(path: &Path, e: std::io::Error) -> anyhow::Error {
    // O_NOFOLLOW on a symlink fails with ELOOP.
    if e.raw_os_error() == Some(libc::ELOOP) || std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()) {
        return user(format!("refusing to write {}: it is a symbolic link (name the file itself)", path.display()));
    }
    user(format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("pf-output-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn symlinks_are_refused_and_their_target_kept() {
        let d = dir("link");
        let target = d.join("target");
        std::fs::write(&target, "keep me").unwrap();
        let link = d.join("out");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = create(&link).unwrap_err();
        assert!(e.chain().any(|c| c.downcast_ref::<crate::error::UserError>().is_some()));
        assert_eq!(
            e.to_string(),
            format!("refusing to write {}: it is a symbolic link (name the file itself)", link.display())
        );
        assert!(create_new(&link).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
        let e = ensure_dir(&link, "trace_dir").unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("nginx: worker"), "nginx: worker");
        assert_eq!(printable("a\x1b]0;pwned\x07b"), "a\\x1b]0;pwned\\x07b");
        assert_eq!(printable("x\ny\rz\u{9b}2J"), "x\\x0ay\\x0dz\\u{9b}2J");
        assert_eq!(printable("dé\x7f"), "dé\\x7f");
    }

    #[test]
    fn regular_files_are_overwritten_new_ones_are_not() {
        let d = dir("regular");
        let p = d.join("f");
        std::fs::write(&p, "old contents").unwrap();
        create(&p).unwrap().write_all(b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
        assert_eq!(create_new(&p).unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
        let q = d.join("g");
        create_new(&q).unwrap();
        // The umask can only take bits away.
        let mode = std::fs::metadata(&q).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !MODE, 0, "mode {mode:o}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
