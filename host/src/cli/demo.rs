//! The dev stack's demo: a tenant, a study and a record through the public
//! HTTPS API and back.

use anyhow::{Context, Result, ensure};
use coffer_keyhost::tls::{client_config, install_crypto_provider};
use coffer_softhsm::DevCa;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

async fn call(request: reqwest::RequestBuilder) -> Result<Value> {
    let response = request.send().await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    ensure!(
        status.is_success(),
        "{status}: {}",
        body["error"]["message"]
    );
    Ok(body)
}

/// The demo tenant's keys, for `dev.env` and the client subcommands.
pub(crate) struct DemoKeys {
    pub admin: SecretString,
    pub writer: SecretString,
    pub reader: SecretString,
    pub study: String,
}

/// Creates the demo tenant, a study, writer and reader keys, stores a
/// record and reads it back.
pub(crate) async fn round_trip(ca: &DevCa, api: &str, operator: &SecretString) -> Result<DemoKeys> {
    install_crypto_provider();
    let tls = client_config(&ca.cert_path(), None)?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()?;
    let bearer = |key: &str| format!("Bearer {key}");

    let tenant = call(
        client
            .post(format!("{api}/v1/tenants"))
            .header("authorization", bearer(operator.expose_secret()))
            .json(&json!({"name": "Demo research institute"})),
    )
    .await?;
    let admin = tenant["admin_key"]
        .as_str()
        .context("no admin key")?
        .to_owned();
    let study = call(
        client
            .post(format!("{api}/v1/studies"))
            .header("authorization", bearer(&admin))
            .json(&json!({"name": "Demo study"})),
    )
    .await?;
    let study = study["id"].as_str().context("no study id")?;
    // The demo writer may make deterministic field tokens (can_link).
    let key = |role: &str| {
        client
            .post(format!("{api}/v1/api-keys"))
            .header("authorization", bearer(&admin))
            .json(&json!({"role": role, "name": format!("demo {role}"), "can_link": role == "writer"}))
    };
    let writer = call(key("writer")).await?["secret"]
        .as_str()
        .context("no secret")?
        .to_owned();
    let reader = call(key("reader")).await?["secret"]
        .as_str()
        .context("no secret")?
        .to_owned();

    let data = json!({"age": 42, "enrolled": "2026-11-02"});
    let stored = call(
        client
            .post(format!("{api}/v1/studies/{study}/records"))
            .header("authorization", bearer(&writer))
            .json(&json!({"participant": "P-001", "kind": "demographics", "data": data})),
    )
    .await?;
    let token = stored["token"].as_str().context("no token")?;
    println!(
        "  tenant {}, study {study}: stored a record as {token}",
        tenant["id"].as_str().unwrap_or("?")
    );
    let back = call(
        client
            .get(format!("{api}/v1/records/{token}"))
            .header("authorization", bearer(&reader)),
    )
    .await?;
    ensure!(back["data"] == data, "the record came back different");
    println!(
        "  read {token} back over HTTPS through the encryption host, key host and blob nodes: identical"
    );
    let fields = call(
        client
            .post(format!("{api}/v1/studies/{study}/tokenize"))
            .header("authorization", bearer(&writer))
            .json(&json!({"participant": "P-001", "fields": {"name": "Jane Roe", "ssn": "123-45-6789"},
                          "deterministic": ["ssn"]})),
    )
    .await?;
    let tokens: Vec<&str> = ["name", "ssn"]
        .iter()
        .filter_map(|f| fields["fields"][f].as_str())
        .collect();
    let values = call(
        client
            .post(format!("{api}/v1/detokenize"))
            .header("authorization", bearer(&reader))
            .json(&json!({ "tokens": tokens })),
    )
    .await?;
    ensure!(
        tokens.len() == 2
            && values["values"][tokens[0]] == "Jane Roe"
            && values["values"][tokens[1]] == "123-45-6789",
        "field tokens did not come back"
    );
    println!(
        "  tokenized two fields as {} and {} (deterministic, from the study's HSM linking key) and back",
        tokens[0], tokens[1]
    );
    Ok(DemoKeys {
        admin: SecretString::from(admin),
        writer: SecretString::from(writer),
        reader: SecretString::from(reader),
        study: study.to_owned(),
    })
}
