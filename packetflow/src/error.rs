//! Errors that reach the user: one sentence, and an exit code.
//!
//! A [`UserError`] anywhere in an `anyhow` chain means "the user asked for something that
//! cannot be done here" (bad input, missing capability, no BTF...): exit code 2. Anything
//! else is a failure of packetflow itself: exit code 1. Neither prints a backtrace.

use std::fmt;

#[derive(Debug)]
pub struct UserError(pub String);

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserError {}

/// Returns early with a [`UserError`] built like `format!`.
#[macro_export]
macro_rules! user_bail {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::error::UserError(format!($($arg)*))))
    };
}

/// A [`UserError`] as an `anyhow::Error`.
pub fn user(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UserError(msg.into()))
}

/// Exit code and the one line to print for `err`.
pub fn report(err: &anyhow::Error) -> (i32, String) {
    let is_user = err.chain().any(<dyn std::error::Error + 'static>::is::<UserError>);
    // The outermost context carries the sentence; inner causes add the detail.
    let mut line = err.to_string();
    let causes: Vec<String> = err.chain().skip(1).map(std::string::ToString::to_string).collect();
    if !causes.is_empty() && !is_user {
        line = format!("{line}: {}", causes.join(": "));
    }
    (if is_user { 2 } else { 1 }, line)
}
