//! Reading libtest's output: test counts, test binaries that died before their result
//! line, and the skip markers of tests that could not check their subject.

use super::SKIP_MARKER;

/// Test counts summed over libtest's `test result:` lines.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Counts {
    /// Adds a "test result: ok. 5 passed; 0 failed; 1 ignored; ..." line (others are ignored).
    pub fn add_result_line(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("test result: ") {
            self.passed += count_before(rest, "passed");
            self.failed += count_before(rest, "failed");
            self.ignored += count_before(rest, "ignored");
        }
    }
}

/// Which test binaries finished: libtest opens each run with "running N tests" and
/// closes it with "test result: ..."; a binary that dies in between prints no result.
#[derive(Default, Debug)]
pub struct Runs {
    pub started: u64,
    pub finished: u64,
    /// The test named by the last "test NAME ... " line (with --test-threads=1 libtest
    /// prints it before the test runs).
    pub last_started: Option<String>,
}

impl Runs {
    pub fn add_line(&mut self, line: &str) {
        if line.starts_with("running ") && (line.ends_with(" tests") || line.ends_with(" test")) {
            self.started += 1;
        } else if line.starts_with("test result: ") {
            self.finished += 1;
        } else if let Some((name, _)) = line.strip_prefix("test ").and_then(|rest| rest.split_once(" ...")) {
            self.last_started = Some(name.to_string());
        }
    }

    /// Binaries that started and printed no result.
    pub fn unfinished(&self) -> u64 {
        self.started.saturating_sub(self.finished)
    }
}

/// (test name, reason) of each `PACKETFLOW-SKIP: <test name>: <reason>` line in `text`.
pub fn parse_skips(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(SKIP_MARKER))
        .map(|rest| match rest.split_once(": ") {
            Some((name, reason)) => (name.to_string(), reason.to_string()),
            None => (rest.to_string(), "no reason given".to_string()),
        })
        .collect()
}

/// "kprobes unavailable (2), ping missing (1)": the reasons, most frequent first.
pub fn group_reasons(skips: &[(String, String)]) -> String {
    let mut by: Vec<(&str, usize)> = Vec::new();
    for (_, r) in skips {
        match by.iter_mut().find(|(x, _)| *x == r) {
            Some(e) => e.1 += 1,
            None => by.push((r, 1)),
        }
    }
    by.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    by.iter().map(|(r, n)| format!("{r} ({n})")).collect::<Vec<_>>().join(", ")
}

/// The number in front of `word` in "ok. 5 passed; 0 failed; 1 ignored; ...".
pub(crate) fn count_before(s: &str, word: &str) -> u64 {
    let words: Vec<&str> =
        s.split(|c: char| c == ';' || c == '.' || c.is_whitespace()).filter(|w| !w.is_empty()).collect();
    words.windows(2).find(|w| w[1] == word).and_then(|w| w[0].parse().ok()).unwrap_or(0)
}

/// The first panic message of each failing test, from libtest's "---- NAME stdout ----"
/// sections, so the suite's closing block says why a test failed, not only which.
#[derive(Default, Debug)]
pub struct Panics {
    section: Option<String>,
    after_panic: bool,
    pub found: Vec<(String, String)>,
}

impl Panics {
    pub fn add_line(&mut self, line: &str) {
        if let Some(name) = line.strip_prefix("---- ").and_then(|r| r.strip_suffix(" stdout ----")) {
            self.section = Some(name.to_string());
            self.after_panic = false;
        } else if line.contains("' panicked at ") || line.starts_with("thread '") && line.contains("panicked") {
            self.after_panic = true;
        } else if self.after_panic {
            self.after_panic = false;
            if let Some(name) = self.section.take() {
                let msg: String = line.trim().chars().take(400).collect();
                self.found.push((name, msg));
            }
        }
    }

    /// "  FAILED name: message" lines.
    pub fn describe(&self, indent: &str) -> Vec<String> {
        self.found.iter().map(|(n, m)| format!("{indent}FAILED {n}: {m}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_take_the_line_after_panicked_at() {
        let mut p = Panics::default();
        for l in [
            "---- drops::x stdout ----",
            "some output",
            "thread 'drops::x' panicked at tests/tests/e2e/drops.rs:10:5:",
            "expected 3 drops, saw 2",
            "note: run with `RUST_BACKTRACE=1`",
        ] {
            p.add_line(l);
        }
        assert_eq!(p.found, vec![("drops::x".to_string(), "expected 3 drops, saw 2".to_string())]);
    }
}
