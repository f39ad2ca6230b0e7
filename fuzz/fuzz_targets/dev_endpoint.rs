#![no_main]
// The dev directory's server.toml as `sso-agent --dev` and `ssoctl --dev` read it for the
// dev server's port: any text gives a URL on localhost or an error, never a panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(url) = sso_devdir::endpoint_from_config(text)
    {
        assert!(url.starts_with("https://localhost:"), "{url}");
    }
});
