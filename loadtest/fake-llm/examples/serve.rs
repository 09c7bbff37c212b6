//! Serves the fake on a given address until Ctrl-C: `cargo run -p fake-llm --example serve -- 127.0.0.1:8080`.
#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("fake-llm on http://{}", listener.local_addr()?);
    fake_llm::run(listener, fake_llm::FakeLlmConfig::default(), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
