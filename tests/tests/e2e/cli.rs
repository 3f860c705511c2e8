//! The command line as a user meets it: the seed client/server lines, `doctor` telling the
//! truth about this kernel, and bad input answered with one sentence and exit code 2.

use std::process::Command;

use packetflow_tests::*;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One clear sentence, exit 2, no panic or backtrace.
fn assert_refused(o: &std::process::Output, needle: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(2), "exit code, stderr: {e}");
    assert!(e.contains(needle), "expected '{needle}' in: {e}");
    assert!(!e.contains("panicked") && !e.contains("backtrace") && !e.contains("RUST_BACKTRACE"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
}

#[test]
fn seed_exchange_prints_the_seed_lines_tcp_udp_ipv4_ipv6() {
    require_root();
    for (addr, udp) in [("127.0.0.1", false), ("127.0.0.1", true), ("::1", false), ("::1", true)] {
        let port = unique_port();
        let _srv = serve(None, addr, port, udp);
        let out = client(None, addr, port, 1, 18, udp);
        let shown_addr = if addr.contains(':') { format!("[{addr}]:{port}") } else { format!("{addr}:{port}") };
        assert!(out.contains(&format!("Connected to server {shown_addr}")), "{out}");
        assert!(out.contains("Message sent: Hello from client!"), "{out}");
        assert!(out.contains("Server response: Hello from server!"), "{out}");
        let many = client(None, addr, port, 20, 100, udp);
        assert!(many.contains("20 exchanges of 100 bytes"), "{many}");
    }
}

#[test]
fn server_prints_received_and_sent_lines() {
    require_root();
    let port = unique_port();
    let srv = Command::new(bin())
        .args(["serve", "--port", &port.to_string(), "--bind", "127.0.0.1", "--once"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("serve");
    let mut srv = Proc(srv);
    std::thread::sleep(std::time::Duration::from_millis(300));
    client(None, "127.0.0.1", port, 1, 18, false);
    srv.wait(std::time::Duration::from_secs(5)).expect("server exits after --once");
    let mut out = String::new();
    std::io::Read::read_to_string(srv.0.stdout.as_mut().expect("stdout"), &mut out).expect("read");
    for line in [
        format!("Server listening on port {port}"),
        "Client connected".into(),
        "Received message: Hello from client!".into(),
        "Response sent: Hello from server!".into(),
    ] {
        assert!(out.contains(&line), "missing '{line}' in {out}");
    }
}

#[test]
fn bad_input_gets_one_sentence_and_exit_2() {
    require_root();
    let port = unique_port();
    let _busy = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    assert_refused(&packetflow(&["serve", "--port", &port.to_string(), "--bind", "127.0.0.1"]), "already in use");
    assert_refused(&packetflow(&["client", "127.0.0.1", "--port", &unique_port().to_string()]), "connection refused");
    assert_refused(&packetflow(&["client", "300.1.1.1"]), "not an IP address");
    assert_refused(&packetflow(&["serve", "--bind", "198.18.77.77", "--port", "1"]), "not an address of this host");
    assert_refused(&packetflow(&["trace", "-i", "no-such-if0", "--duration", "1"]), "unknown interface 'no-such-if0'");
    assert_refused(&packetflow(&["trace", "--netns", "/run/netns/no-such-ns", "--duration", "1"]), "does not exist");
    let nine: Vec<String> = (1..=9).flat_map(|p| ["--port".to_string(), p.to_string()]).collect();
    let mut args = vec!["trace"];
    args.extend(nine.iter().map(String::as_str));
    assert_refused(&packetflow(&args), "at most 8 --port");
    assert_refused(&packetflow(&["trace", "--duration", "0"]), "--duration");
    // clap's own errors: exit 2 too.
    assert_eq!(packetflow(&["trace", "--proto", "sctp"]).status.code(), Some(2));
}

#[test]
fn without_privileges_tracing_names_the_missing_capability() {
    require_root();
    for sub in ["trace", "demo", "doctor"] {
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin())
            .arg(sub)
            .output()
            .expect("setpriv (util-linux)");
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{sub}: {e}");
        assert!(e.contains("CAP_BPF") && e.contains("sudo"), "{sub}: {e}");
        assert!(!e.contains("panicked"), "{e}");
    }
}

#[test]
fn doctor_tells_the_truth_about_this_kernel() {
    require_root();
    let o = packetflow(&["doctor"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    let row = |name: &str| -> String {
        out.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} row in {out}"))
            .to_string()
    };
    assert!(row("BTF").contains(" ok "), "{out}");
    for works in ["tracepoint", "raw_tp", "tp_btf", "ring buffer", "XDP generic (lo)", "XDP native (veth)", "tcx (lo)"]
    {
        assert!(row(works).contains(" ok "), "{works}: {out}");
    }
    // capture --bypass and blast: an AF_XDP socket binds on a veth (copy mode: veth has
    // no zero-copy) and a live-frame run goes out of it; lo never has zero-copy.
    assert!(row("AF_XDP (veth)").contains(" ok  copy mode"), "{out}");
    assert!(row("XDP live frames (blast)").contains(" ok "), "{out}");
    let per_if = row("AF_XDP per interface");
    assert!(per_if.contains("lo: copy mode") || per_if.contains("does not say"), "{out}");
    // Decided by trying: on this machine fentry is refused by lockdown and kprobes do
    // not exist. On a kernel that allows them, these rows say "works" instead.
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    if lockdown.contains("[integrity]") || lockdown.contains("[confidentiality]") {
        assert!(row("fentry").contains("refused: EPERM"), "{out}");
        assert!(out.contains("uses tracepoints"), "{out}");
    }
    let kprobes = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    if !kprobes {
        assert!(row("kprobe").contains("unavailable"), "{out}");
    }
    // Every stage is served, but the IP-layer ones, which need kprobes: without them
    // their rows say why they are absent.
    for stage in packetflow_common::Stage::ALL {
        let line = out.lines().find(|l| l.starts_with(&format!("{} ", stage.name()))).unwrap_or_default();
        if stage.is_optional() && !kprobes {
            assert!(line.contains("missing: this kernel has no kprobes"), "{} in {out}", stage.name());
        } else {
            assert!(line.contains("available"), "{} in {out}", stage.name());
        }
    }
}

#[test]
fn deeply_nested_capture_filter_gets_one_sentence_and_exit_2() {
    require_root();
    // 100,000 '!' once overflowed the parser's stack (SIGSEGV/abort, no message).
    let deep = format!("{}tcp", "!".repeat(100_000));
    let o = packetflow(&["capture", "-i", "lo", "-c", "1", &deep]);
    assert_refused(&o, "filter expression nests deeper than 64 levels");
    assert!(stderr(&o).len() < 400, "short: {}", stderr(&o));
    // A long and/or chain, as separate words (one argument may not pass 128 KiB).
    let mut args = vec!["capture", "-i", "lo", "-c", "1", "port", "80"];
    for _ in 0..20_000 {
        args.extend(["or", "port", "80"]);
    }
    let o = packetflow(&args);
    assert_refused(&o, "more than 256 terms");
}

/// `doctor --json` is one object with the same verdicts as the table.
#[test]
fn doctor_json_is_one_object_with_every_check() {
    require_root();
    let o = packetflow(&["doctor", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("doctor --json is one JSON object");
    assert_eq!(j["tracing_works"], true, "{j}");
    let check = |name: &str| j["checks"].as_array().unwrap().iter().find(|c| c["check"] == name).cloned();
    assert_eq!(check("BTF").expect("a BTF check")["ok"], true);
    assert_eq!(check("tp_btf").expect("a tp_btf check")["ok"], true);
    let stages = j["stages"].as_array().expect("stages");
    assert!(stages.iter().any(|s| s["stage"] == "dev_queue" && s["status"] == "available"), "{j}");
}

/// Completions load into bash and complete subcommands and flags; man pages are written
/// for every subcommand and name their flags.
#[test]
fn completions_load_in_bash_and_man_pages_cover_every_subcommand() {
    let o = packetflow(&["completions", "bash"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = std::env::temp_dir().join(format!("pf-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("packetflow.bash");
    std::fs::write(&script, &o.stdout).unwrap();
    // Load it the way bash-completion does, then ask for the words after `packetflow ca`
    // and `packetflow capture --c`.
    let complete = |line: &str| -> String {
        let words: Vec<&str> = line.split(' ').collect();
        let program = format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT={}; _packetflow packetflow '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
            words.len() - 1,
            line.len(),
            words[words.len() - 1],
            words[words.len() - 2],
        );
        let o = Command::new("bash").args(["--norc", "-c", &program]).output().expect("bash");
        assert!(o.status.success(), "bash: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let subs = complete("packetflow ca");
    assert!(subs.lines().any(|l| l == "capture"), "{subs}");
    let flags = complete("packetflow capture --c");
    assert!(flags.lines().any(|l| l == "--count"), "{flags}");
    for shell in ["zsh", "fish"] {
        let o = packetflow(&["completions", shell]);
        assert!(o.status.success() && o.stdout.len() > 1000, "{shell}: {}", stderr(&o));
    }

    let man = dir.join("man");
    let o = packetflow(&["man", man.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for sub in ["trace", "capture", "demo", "report", "daemon", "status", "doctor", "blast", "completions", "man"] {
        let page = std::fs::read_to_string(man.join(format!("packetflow-{sub}.1"))).unwrap_or_default();
        assert!(page.starts_with(".ie") || page.contains(".TH"), "packetflow-{sub}.1: {page:.200}");
        assert!(page.contains(&format!("packetflow\\-{sub}")), "packetflow-{sub}.1 names itself");
    }
    let capture = std::fs::read_to_string(man.join("packetflow-capture.1")).unwrap();
    assert!(capture.contains("\\-\\-bypass") && capture.contains("Examples"), "{capture:.400}");
    let top = std::fs::read_to_string(man.join("packetflow.1")).unwrap();
    assert!(top.contains("packetflow\\-capture(1)"), "the main page lists the subcommands' pages");
    let _ = std::fs::remove_dir_all(&dir);
}

/// tcpdump's habits are accepted: -n/-nn, and -c/--count on both trace and capture.
#[test]
fn tcpdump_habits_parse() {
    for args in [
        &["capture", "-n", "--help"][..],
        &["capture", "-nn", "--help"],
        &["capture", "--count", "3", "--help"],
        &["trace", "-c", "3", "--help"],
    ] {
        let o = packetflow(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    }
    // -D: the interfaces, each with its XDP modes and who holds its XDP slot.
    let o = packetflow(&["capture", "-D"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let lo = out.lines().find(|l| l.contains(".lo [")).unwrap_or_else(|| panic!("no lo in {out}"));
    assert!(lo.contains("Loopback") && lo.contains("XDP generic") && lo.contains("XDP slot free"), "{lo}");
}
