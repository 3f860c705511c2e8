//! The test-host fixture: two namespaces joined by veth, reachable from each other, and
//! gone after drop, also when the test panics.

use packetflow_tests::*;

fn exists(ns: &str) -> bool {
    std::path::Path::new(&format!("/run/netns/{ns}")).exists()
}

#[test]
fn hosts_talk_over_veth_and_vanish_on_drop_even_after_a_panic() {
    require_root();
    let (a, b) = {
        let h = TestHosts::new("pftest").expect("create test hosts");
        assert!(exists(&h.ns_a) && exists(&h.ns_b));
        assert_ne!(h.ns_a, h.ns_b);
        for target in [testhosts::ADDR_B, testhosts::ADDR6_B] {
            // Without ping (cargo xtask setup installs it) this check would not be made: fail.
            let o = h.command(&h.ns_a, "ping").args(["-c", "1", "-W", "2", target]).output().expect("running ping");
            assert!(o.status.success(), "ping {target}: {}", String::from_utf8_lossy(&o.stdout));
        }
        let port = unique_port();
        let _srv = serve(Some(&h.path_b()), "0.0.0.0", port, false);
        let out = client(Some(&h.path_a()), testhosts::ADDR_B, port, 3, 64, false);
        assert!(out.contains("Server response"), "{out}");
        (h.ns_a.clone(), h.ns_b.clone())
    };
    assert!(!exists(&a) && !exists(&b), "namespaces left behind");

    let names = std::panic::catch_unwind(|| {
        let h = TestHosts::new("pftest").expect("create");
        let n = (h.ns_a.clone(), h.ns_b.clone());
        std::panic::panic_any(n);
    })
    .expect_err("panics");
    let (a, b) = names.downcast_ref::<(String, String)>().expect("names").clone();
    assert!(!exists(&a) && !exists(&b), "namespaces left behind after a panic");
}
