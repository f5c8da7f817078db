//! A real client no one here wrote: the official OpenAI Python SDK (in the
//! venv `cargo xtask setup` creates) talks to the gateway.

use std::path::PathBuf;

use gateway_tests::{
    l7::{model_toml, TestGateway, KEY_A},
    mock::{MockLlm, MockOptions},
};

fn python() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let py = root.join(".venv/bin/python");
    if py.exists() {
        return Some(py);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{} is missing: `cargo xtask setup` creates it",
            py.display()
        );
    }
    gateway::kernel::testrun::skipped(
        "openai_sdk",
        "no .venv with the openai SDK; run `cargo xtask setup`",
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_sdk_through_the_gateway() {
    let Some(py) = python() else { return };
    let up = MockLlm::start(MockOptions {
        name: "a".into(),
        tokens: 8,
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let g = TestGateway::start(
        "",
        &model_toml(
            "sdk-model",
            "aliases = [\"gpt-4o-mini\"]",
            &[(up.url(), 1, None)],
        ),
    )
    .await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk/openai_client.py");
    let out = tokio::process::Command::new(py)
        .arg(script)
        .args([
            "--base-url",
            &format!("{}/v1", g.url),
            "--key",
            KEY_A,
            "--model",
            "sdk-model",
        ])
        .output()
        .await
        .expect("running the SDK script");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the SDK script failed: {stderr}");
    let seen: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    assert_eq!(seen["bad_key_status"], 401, "{seen}");
    assert_eq!(seen["bad_key_code"], "invalid_api_key", "{seen}");
    assert_eq!(seen["non_stream_usage"]["completion_tokens"], 8, "{seen}");
    assert_eq!(seen["stream_usage"]["completion_tokens"], 8, "{seen}");
    assert!(seen["stream_chunks"].as_u64().unwrap() >= 8, "{seen}");
    // The SDK's form reached the backend whole, its alias renamed.
    let form = up
        .requests()
        .into_iter()
        .find(|r| r.path == "/v1/audio/transcriptions")
        .expect("the transcription reached the backend");
    let form = form.body.as_str().expect("recorded as text");
    assert!(
        form.contains("name=\"model\"\r\n\r\nsdk-model\r\n"),
        "renamed for the backend: {form:.400}"
    );
    assert!(form.contains("filename=\"clip.wav\""), "{form:.400}");
    assert!(
        form.contains("name=\"language\"\r\n\r\nen\r\n"),
        "{form:.400}"
    );
    assert!(
        seen["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "gpt-4o-mini"),
        "{seen}"
    );
}
