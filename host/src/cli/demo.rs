//! The dev stack's demo: a record through the encryption host and back,
//! playing the API host's part (its certificate, a context digest).

use anyhow::{Context, Result, ensure};
use coffer_keyhost::api::roles;
use coffer_keyhost::tls::{client_config, install_crypto_provider};
use coffer_softhsm::DevCa;
use sha2::{Digest, Sha256};

/// Creates a KEK, stores a demo record, reads it back and compares.
pub(crate) async fn round_trip(ca: &DevCa, encryptd: &str) -> Result<()> {
    install_crypto_provider();
    let cert = ca.client(roles::API_HOST)?;
    let tls = client_config(&ca.cert_path(), Some((&cert.cert, &cert.key)))?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()?;

    let kek: serde_json::Value = client
        .post(format!("{encryptd}/v1/keks"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let kek = kek["kek"]
        .as_str()
        .context("no KEK in the answer")?
        .to_owned();
    let record = br#"{"participant":"P-001","kind":"demographics","data":{"age":42}}"#.to_vec();
    // The API host's context digest (tenant, study, token, participant, format).
    let context = data_encoding::HEXLOWER.encode(&Sha256::digest(
        b"demo-tenant/demo-study/demo-token/P-001/v1",
    ));
    let stored: serde_json::Value = client
        .put(format!("{encryptd}/v1/objects?kek={kek}"))
        .header("x-coffer-context", &context)
        .body(record.clone())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let (key_ref, blob_ref) = (
        stored["key_ref"].as_str().context("no key ref")?,
        stored["blob_ref"].as_str().context("no blob ref")?,
    );
    println!(
        "  stored a {}-byte record: key ref {key_ref}, blob ref {blob_ref}",
        record.len()
    );
    let back = client
        .get(format!(
            "{encryptd}/v1/objects/{blob_ref}?key_ref={key_ref}&whole=true"
        ))
        .header("x-coffer-context", &context)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    ensure!(
        back.as_ref() == record.as_slice(),
        "the record came back different"
    );
    println!("  read it back through the key host and the blob nodes: identical");
    Ok(())
}
