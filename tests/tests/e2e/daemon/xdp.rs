//! The XDP clobber check: another program's XDP is kept unless `--force`, and `--force`
//! removes only what it can tell apart.

use super::*;

#[test]
fn another_programs_xdp_is_not_clobbered_without_force() {
    require_root();
    let h = TestHosts::new("pfdx").expect("test hosts");
    let json = tmp("daemon-xdp-holder.json");
    let spec = format!("{}@{}", h.veth_b, h.ns_b);
    let mut holder = start_trace(&["-i", &spec, "--port", "1"], &json);
    let metrics = free_port();
    let (cfg, _) = config("daemon-xdp", metrics, &format!("stages = \"all\"\ninterfaces = [\"{spec}\"]\n"));
    let out = Command::new(bin()).args(["daemon", "--config"]).arg(&cfg).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let want = format!("held by pid {} (packetflow)", holder.0.id());
    assert!(
        err.contains(&format!("interface {} already has an XDP program", h.veth_b)) && err.contains(&want),
        "{err}"
    );
    assert!(err.contains("--force"), "{err}");
    assert!(xdp_on(&h, &h.ns_b, &h.veth_b).contains("pf_xdp"), "the holder's program is still there");

    let d = Daemon::start(&cfg, metrics, &["--force"]);
    assert!(d.logged("--force: detached the XDP program"), "{:?}", d.lines());
    let m = d.scrape();
    assert_eq!(
        value(&m, &format!("packetflow_stage_available{{stage=\"xdp\",hook=\"XDP on {} (native)\"}}", h.veth_b)),
        Some(1.0),
        "{m}"
    );
    drop(d);
    let _ = holder.interrupt(Duration::from_secs(5));
}

/// The id of the XDP program on `dev` in namespace `ns` ("prog/xdp id N" in `ip -d link`).
fn xdp_prog_id(ns: &str, dev: &str) -> Option<u32> {
    let out = Command::new("ip").args(["-n", ns, "-d", "link", "show", "dev", dev]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rest = text.split("prog/xdp id ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The interface index of `dev` in namespace `ns`.
fn ifindex_in(ns: &str, dev: &str) -> u32 {
    let out = Command::new("ip").args(["-n", ns, "-o", "link", "show", "dev", dev]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split(':').next().unwrap().trim().parse().unwrap()
}

#[test]
fn force_detaches_the_holders_xdp_only_from_the_named_interface() {
    require_root();
    let h = TestHosts::new("pfdo").expect("test hosts");
    // A second interface beside veth_b in the same namespace (a veth pair of its own).
    let (c, d) = (format!("{}c", h.veth_b), format!("{}d", h.veth_b));
    testhosts::ip(&["-n", &h.ns_b, "link", "add", &c, "type", "veth", "peer", "name", &d]).unwrap();
    for dev in [&c, &d] {
        testhosts::ip(&["-n", &h.ns_b, "link", "set", dev, "up"]).unwrap();
    }
    let json = tmp("daemon-force-holder.json");
    let (spec_b, spec_c) = (format!("{}@{}", h.veth_b, h.ns_b), format!("{c}@{}", h.ns_b));
    let mut holder = start_trace(&["-i", &spec_b, "-i", &spec_c, "--port", "1"], &json);
    let prog = xdp_prog_id(&h.ns_b, &h.veth_b).expect("the holder's XDP program on veth_b");
    assert_eq!(xdp_prog_id(&h.ns_b, &c), Some(prog), "one program, two interfaces");

    let metrics = free_port();
    let (cfg, _) = config("daemon-force", metrics, &format!("stages = \"all\"\ninterfaces = [\"{spec_b}\"]\n"));
    let d1 = Daemon::start(&cfg, metrics, &["--force"]);
    assert!(d1.logged(&format!("--force: detached the XDP program {prog}")), "{:?}", d1.lines());
    let now_b = xdp_prog_id(&h.ns_b, &h.veth_b);
    assert!(now_b.is_some() && now_b != Some(prog), "the daemon's program replaced the holder's on veth_b: {now_b:?}");
    assert_eq!(xdp_prog_id(&h.ns_b, &c), Some(prog), "the holder keeps its program on {c}");
    drop(d1);
    let _ = holder.interrupt(Duration::from_secs(5));
}

#[test]
fn force_detaches_nothing_it_cannot_tell_apart() {
    require_root();
    // veth_a and veth_b live in two namespaces, each with its own index space: they may
    // share an index, and an XDP bpf_link tells the index but not the namespace.
    let h = TestHosts::new("pfdn").expect("test hosts");
    let json = tmp("daemon-force-ns-holder.json");
    let (spec_a, spec_b) = (format!("{}@{}", h.veth_a, h.ns_a), format!("{}@{}", h.veth_b, h.ns_b));
    let mut holder = start_trace(&["-i", &spec_a, "-i", &spec_b, "--port", "1"], &json);
    let prog = xdp_prog_id(&h.ns_a, &h.veth_a).expect("the holder's XDP program on veth_a");
    assert_eq!(xdp_prog_id(&h.ns_b, &h.veth_b), Some(prog));
    let metrics = free_port();
    let (cfg, _) = config("daemon-force-ns", metrics, &format!("stages = \"all\"\ninterfaces = [\"{spec_b}\"]\n"));
    if ifindex_in(&h.ns_a, &h.veth_a) == ifindex_in(&h.ns_b, &h.veth_b) {
        let child = Command::new(bin())
            .args(["daemon", "--force", "--config"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut p = Proc(child);
        // Bounded: a daemon that detached something starts and runs (killed on drop).
        let code = p.wait(Duration::from_secs(20)).and_then(|s| s.code());
        if code.is_none() {
            let _ = p.0.kill();
        }
        let mut err = String::new();
        let _ = p.0.stderr.take().unwrap().read_to_string(&mut err);
        assert_eq!(code, Some(2), "refused, not started: {err}");
        assert!(err.contains("--force detaches nothing") && err.contains("network namespaces"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(xdp_prog_id(&h.ns_b, &h.veth_b), Some(prog), "veth_b keeps the holder's program");
    } else {
        let d = Daemon::start(&cfg, metrics, &["--force"]);
        assert!(d.logged("--force: detached"), "{:?}", d.lines());
        drop(d);
    }
    assert_eq!(xdp_prog_id(&h.ns_a, &h.veth_a), Some(prog), "the holder keeps its program on veth_a");
    let _ = holder.interrupt(Duration::from_secs(5));
}
