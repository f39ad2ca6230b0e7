//! Seal and open against a dev server. Run `cargo run -p sso-server -- --dev` in one
//! terminal, then from the same directory: `cargo run -p sso-client --example seal_open`.

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), sso_client::Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = sso_client::Client::builder()
        .endpoint("https://localhost:7443")
        .ca("sso-dev/ca.pem")
        .identity("sso-dev/client.pem", "sso-dev/client-key.pem")
        .build()?;
    let envelope = client.seal(b"table=users", b"secret data").await?;
    let opened = client.open(b"table=users", &envelope).await?;
    assert_eq!(opened, b"secret data");
    println!(
        "sealed {} bytes into {} and opened them again",
        opened.len(),
        envelope.len()
    );
    println!("{:?}", client.status());
    Ok(())
}
