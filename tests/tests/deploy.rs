//! The systemd units in deploy/systemd: the sandboxing they promise is there, and
//! `systemd-analyze verify` accepts them (pointed at the freshly built binaries).

use std::path::Path;

#[test]
fn systemd_units_are_hardened_and_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut units = Vec::new();
    for (unit, binary) in [("sso-server.service", "sso-server"), ("sso-agent.service", "sso-agent")] {
        let text = std::fs::read_to_string(root.join("deploy/systemd").join(unit)).unwrap();
        for needed in [
            "Type=notify",
            "LimitCORE=0",
            "LimitMEMLOCK=infinity",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "MemoryDenyWriteExecute=yes",
            "PrivateTmp=yes",
            "UMask=0077",
        ] {
            assert!(text.lines().any(|l| l.trim() == needed), "{unit} lacks {needed}");
        }
        let built = tests::bin(binary);
        let local = text.replace(&format!("/usr/bin/{binary}"), &built.display().to_string());
        assert_ne!(local, text, "{unit} does not start /usr/bin/{binary}");
        units.push((unit, local));
    }
    tests::systemd_verify(&units);
}
