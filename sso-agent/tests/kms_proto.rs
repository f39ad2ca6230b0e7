//! The checked-in Kubernetes KMS v2 bindings (`src/kms/v2.rs`) are exactly what
//! tonic-prost-build makes of `proto/kms/v2/api.proto` today: compiled here with protox
//! (pure Rust, no system `protoc`) and compared byte for byte.
//!
//! After changing the proto or upgrading tonic/prost, regenerate with
//! `SSO_REGENERATE_KMS=1 cargo test -p sso-agent --test kms_proto` and review the diff.

use std::path::Path;

/// The one place the generator's settings live: the check and the regeneration agree.
fn generate(out: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile([root.join("proto/kms/v2/api.proto")], [root.join("proto")]).expect("the proto compiles");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // The client needs no tonic transport (tests bring their own Unix-socket channel),
        // so the library does not pull tonic's channel stack.
        .build_transport(false)
        // Messages that carry a plaintext DEK seed get a hand-written, redacting Debug.
        .skip_debug(["v2.EncryptRequest", "v2.DecryptResponse"])
        .out_dir(out)
        .compile_fds(fds)
        .expect("tonic-prost-build generates the bindings");
    std::fs::read_to_string(out.join("v2.rs")).expect("the generator wrote v2.rs")
}

#[test]
fn checked_in_kms_bindings_match_the_proto() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = generate(dir.path());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("src/kms/v2.rs");
    if std::env::var_os("SSO_REGENERATE_KMS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "{} is not what the proto generates today; run \
         `SSO_REGENERATE_KMS=1 cargo test -p sso-agent --test kms_proto` and review the diff",
        path.display()
    );
    // The proto is the published upstream API, package v2, with its licence header.
    let proto = std::fs::read_to_string(root.join("proto/kms/v2/api.proto")).unwrap();
    assert!(proto.starts_with("/*\nCopyright 2022 The Kubernetes Authors."));
    assert!(proto.contains("package v2;") && proto.contains("service KeyManagementService {"));
}
