//! Client subcommands for the everyday calls, against `COFFER_URL` with the
//! CA in `COFFER_CACERT`. Settings come from flags, then the environment,
//! then `.coffer/dev.env` (what `coffer dev` writes; only if it is the
//! caller's own and nobody else can read or change it). The key is read from
//! `--api-key-file` or `COFFER_KEY`, else it is the dev key of the role the
//! call needs: never a command-line value, which `ps` and shell history keep.
//! Every write carries an `Idempotency-Key` (`--idempotency-key`, or a fresh
//! one), so the retry after a dropped connection stores nothing twice.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

/// Where the API is and who calls it.
#[derive(Debug, Args)]
pub(crate) struct Connection {
    /// API base URL [env: COFFER_URL]
    #[arg(long, global = true)]
    url: Option<String>,
    /// CA certificate to trust (PEM) [env: COFFER_CACERT]
    #[arg(long, global = true)]
    cacert: Option<PathBuf>,
    /// File holding the API key [default: COFFER_KEY, else the dev key of
    /// the role the call needs]
    #[arg(long, global = true)]
    api_key_file: Option<PathBuf>,
    /// Idempotency-Key of a write: the same key again (within 24 h) answers
    /// the first answer and stores nothing twice [default: a fresh one]
    #[arg(long, global = true)]
    idempotency_key: Option<String>,
    /// Settings file written by `coffer dev`.
    #[arg(long, global = true, default_value = ".coffer/dev.env")]
    env_file: PathBuf,
}

/// Which role a call needs, to pick the dev key.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Needs {
    Writer,
    Reader,
    Admin,
}

struct Api {
    http: reqwest::Client,
    url: String,
    key: String,
    /// Sent with every write of this invocation.
    idempotency_key: String,
}

/// `KEY=value` or `KEY='value'` lines, as `coffer dev` writes them; none
/// if there is no such file. A file someone else owns or can read or write
/// is refused: planted in a shared directory, it could send the key to
/// another server.
fn read_env_file(path: &Path) -> Result<HashMap<String, String>> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(HashMap::new());
    };
    if meta.uid() != rustix::process::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        bail!(
            "refusing {}: it must be yours and private (chmod 600), as `coffer dev` writes it",
            path.display()
        );
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), unquote(v.trim())))
        .collect())
}

/// A value as a shell reads `'…'` (with `'\''` for a quote), or as is.
fn unquote(value: &str) -> String {
    match value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        Some(inner) => inner.replace(r"'\''", "'"),
        None => value.to_owned(),
    }
}

impl Connection {
    fn api(&self, needs: Needs) -> Result<Api> {
        let file = read_env_file(&self.env_file)?;
        let setting = |flag: &Option<String>, name: &str| {
            flag.clone()
                .or_else(|| std::env::var(name).ok())
                .or_else(|| file.get(name).cloned())
        };
        let url = setting(&self.url, "COFFER_URL")
            .context("no API URL: pass --url, set COFFER_URL, or run `coffer dev` first")?;
        let cacert = setting(
            &self.cacert.as_ref().map(|p| p.display().to_string()),
            "COFFER_CACERT",
        );
        let role_key = match needs {
            Needs::Writer => "COFFER_WRITER_KEY",
            Needs::Reader => "COFFER_READER_KEY",
            Needs::Admin => "COFFER_ADMIN_KEY",
        };
        let from_file = match &self.api_key_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let key = setting(&from_file, "COFFER_KEY")
            .or_else(|| setting(&None, role_key))
            .with_context(|| {
                format!("no API key: pass --api-key-file, set COFFER_KEY or {role_key}")
            })?;
        if !url.starts_with("https://") {
            anyhow::bail!(
                "the API URL must start with https:// (the API key must never travel in the clear)"
            );
        }
        coffer_keyhost::tls::install_crypto_provider();
        let mut builder = reqwest::Client::builder().https_only(true);
        if let Some(ca) = cacert {
            builder = builder
                .use_preconfigured_tls(coffer_keyhost::tls::client_config(Path::new(&ca), None)?);
        }
        Ok(Api {
            http: builder.build()?,
            url: url.trim_end_matches('/').to_owned(),
            key,
            idempotency_key: self
                .idempotency_key
                .clone()
                .unwrap_or_else(|| crate::api::ids::new("cli")),
        })
    }
}

impl Api {
    /// `<url>/v1/<segments…>`, each segment percent-encoded: an id such as
    /// `P-001#2` or `a/b` stays one path segment and names what was typed.
    fn at(&self, segments: &[&str]) -> Result<reqwest::Url> {
        endpoint(&self.url, segments)
    }

    /// A read.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let response = request
            .bearer_auth(&self.key)
            .send()
            .await
            .context("calling the API")?;
        Self::answer(response).await
    }

    /// A write, with the invocation's `Idempotency-Key`. A JSON write whose
    /// connection failed is sent once more, and one whose first attempt is
    /// still running (409 `idempotency_in_progress`) is asked again for up
    /// to a minute: neither can store anything twice. A failure says which
    /// key retries it safely.
    async fn write(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        // Said when the outcome is unknown (no answer, or a server error).
        let hint = || {
            eprintln!(
                "coffer: to retry without storing twice, pass --idempotency-key {}",
                self.idempotency_key
            );
        };
        let mut request = request
            .bearer_auth(&self.key)
            .header("idempotency-key", &self.idempotency_key);
        let (mut resent, mut waits) = (false, 0);
        loop {
            let again = request.try_clone();
            let response = match (request.send().await, again) {
                (Ok(response), again) => (response, again),
                (Err(e), Some(again))
                    if !resent && (e.is_connect() || e.is_timeout() || e.is_request()) =>
                {
                    eprintln!("coffer: the connection failed ({e}); sending once more");
                    resent = true;
                    request = again;
                    continue;
                }
                (Err(e), _) => {
                    hint();
                    return Err(e).context("calling the API");
                }
            };
            let (response, again) = response;
            let status = response.status();
            let body = Self::body(response).await;
            match again {
                Some(again)
                    if status == reqwest::StatusCode::CONFLICT
                        && body["error"]["code"] == "idempotency_in_progress"
                        && waits < 60 =>
                {
                    waits += 1;
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    request = again;
                }
                _ => {
                    if status.is_server_error() {
                        hint();
                    }
                    return Self::checked(status, body);
                }
            }
        }
    }

    /// The body of a success, or the API's error as an error.
    async fn answer(response: reqwest::Response) -> Result<Value> {
        let status = response.status();
        Self::checked(status, Self::body(response).await)
    }

    async fn body(response: reqwest::Response) -> Value {
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            json!({"ok": true})
        } else {
            response.json().await.unwrap_or_default()
        }
    }

    fn checked(status: reqwest::StatusCode, body: Value) -> Result<Value> {
        if !status.is_success() {
            bail!(
                "{} {}: {} (request {})",
                status.as_u16(),
                body["error"]["code"].as_str().unwrap_or("error"),
                body["error"]["message"].as_str().unwrap_or(""),
                body["error"]["request_id"].as_str().unwrap_or("?")
            );
        }
        Ok(body)
    }
}

/// `<base>/v1/<segments…>` with every segment percent-encoded.
fn endpoint(base: &str, segments: &[&str]) -> Result<reqwest::Url> {
    let mut url = reqwest::Url::parse(base).context("the API URL is not a URL")?;
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("the API URL cannot take a path"))?
        .pop_if_empty()
        .push("v1")
        .extend(segments);
    Ok(url)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn print(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// JSON from a file, or stdin for `-` or none: values never go on the
/// command line, where shell history and `ps` would keep them.
fn read_json(file: Option<&Path>, what: &str) -> Result<Value> {
    let mut text = zeroize::Zeroizing::new(String::new());
    match file {
        Some(path) if path != Path::new("-") => {
            *text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?
        }
        _ => {
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
        }
    }
    serde_json::from_str(&text).with_context(|| format!("{what} is not valid JSON"))
}

/// `coffer put`: stores a JSON record read from a file or stdin.
pub(crate) fn put(
    conn: &Connection,
    study: &str,
    participant: &str,
    kind: Option<&str>,
    file: Option<&Path>,
) -> Result<()> {
    let data = read_json(file, "the record")?;
    let api = conn.api(Needs::Writer)?;
    let body = json!({"participant": participant, "kind": kind, "data": data});
    print(
        &runtime()?.block_on(
            api.write(
                api.http
                    .post(api.at(&["studies", study, "records"])?)
                    .json(&body),
            ),
        )?,
    )
}

/// `coffer get`: a record by its token.
pub(crate) fn get(conn: &Connection, token: &str) -> Result<()> {
    let api = conn.api(Needs::Reader)?;
    print(&runtime()?.block_on(api.send(api.http.get(api.at(&["records", token])?)))?)
}

/// `coffer export`: everything held for one participant.
pub(crate) fn export(conn: &Connection, study: &str, participant: &str) -> Result<()> {
    let api = conn.api(Needs::Reader)?;
    let url = api.at(&["studies", study, "participants", participant, "export"])?;
    print(&runtime()?.block_on(api.send(api.http.get(url)))?)
}

/// `coffer delete`: a record or a BLOB, by its token.
pub(crate) fn delete(conn: &Connection, token: &str) -> Result<()> {
    let collection = if token.starts_with("blb_") {
        "blobs"
    } else if token.starts_with("rec_") {
        "records"
    } else {
        bail!("not a record (rec_…) or BLOB (blb_…) token");
    };
    let api = conn.api(Needs::Admin)?;
    let request = api.http.delete(api.at(&[collection, token])?);
    print(&runtime()?.block_on(api.write(request))?)
}

/// `coffer studies`: the tenant's studies; `--create NAME` makes one.
pub(crate) fn studies(conn: &Connection, create: Option<&str>) -> Result<()> {
    let api = conn.api(Needs::Admin)?;
    let rt = runtime()?;
    let answer = match create {
        Some(name) => rt.block_on(
            api.write(
                api.http
                    .post(api.at(&["studies"])?)
                    .json(&json!({"name": name})),
            ),
        )?,
        None => rt.block_on(api.send(api.http.get(api.at(&["studies"])?)))?,
    };
    print(&answer)
}

/// `coffer put-blob`: streams a file (or stdin) up as a BLOB.
pub(crate) fn put_blob(
    conn: &Connection,
    study: &str,
    participant: &str,
    content_type: &str,
    file: Option<&Path>,
) -> Result<()> {
    let api = conn.api(Needs::Writer)?;
    let rt = runtime()?;
    let body = match file {
        Some(path) if path != Path::new("-") => {
            let file = rt
                .block_on(tokio::fs::File::open(path))
                .with_context(|| format!("opening {}", path.display()))?;
            reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file))
        }
        _ => reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(tokio::io::stdin())),
    };
    let request = api
        .http
        .put(api.at(&["studies", study, "blobs"])?)
        .query(&[("participant", participant)])
        .header("content-type", content_type)
        .body(body);
    print(&rt.block_on(api.write(request))?)
}

/// `coffer get-blob`: streams a BLOB down to a file (or stdout).
pub(crate) fn get_blob(conn: &Connection, token: &str, out: Option<&Path>) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let api = conn.api(Needs::Reader)?;
    let rt = runtime()?;
    rt.block_on(async {
        let response = api
            .http
            .get(api.at(&["blobs", token])?)
            .bearer_auth(&api.key)
            .send()
            .await
            .context("calling the API")?;
        let status = response.status();
        if !status.is_success() {
            return Api::checked(status, Api::body(response).await).map(drop);
        }
        let mut stream = response.bytes_stream();
        let Some(path) = out.filter(|path| *path != Path::new("-")) else {
            let mut stdout = tokio::io::stdout();
            copy_download(&mut stream, &mut stdout).await?;
            return Ok(stdout.flush().await?);
        };
        // Into a private file next to PATH, renamed over it when complete:
        // a broken-off download leaves nothing that looks whole, and no
        // other local user can read the data meanwhile or after.
        let partial = partial_path(path);
        let result = async {
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&partial)
                .await
                .with_context(|| format!("creating {}", partial.display()))?;
            copy_download(&mut stream, &mut file).await?;
            file.sync_all().await?;
            tokio::fs::rename(&partial, path)
                .await
                .with_context(|| format!("writing {}", path.display()))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        result
    })
}

/// Writes a download to `sink` as it arrives.
async fn copy_download(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    sink: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    while let Some(part) = futures::StreamExt::next(stream).await {
        sink.write_all(&part.context("the download broke off")?)
            .await?;
    }
    Ok(())
}

/// `dir/.name.partial-<random>` for `dir/name`.
fn partial_path(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(
        || "download".into(),
        |name| name.to_string_lossy().into_owned(),
    );
    path.with_file_name(format!(".{name}.{}", crate::api::ids::new("partial")))
}

/// `coffer tokenize`: swaps the fields of a JSON object (file or stdin) for
/// tokens; `deterministic` names the fields that get `dtk_` tokens.
pub(crate) fn tokenize(
    conn: &Connection,
    study: &str,
    participant: Option<&str>,
    deterministic: &[String],
    file: Option<&Path>,
) -> Result<()> {
    let fields = read_json(file, "the fields")?;
    if !fields.is_object() {
        bail!("the fields must be a JSON object of names to string values");
    }
    let api = conn.api(Needs::Writer)?;
    let body =
        json!({"participant": participant, "fields": fields, "deterministic": deterministic});
    let request = api
        .http
        .post(api.at(&["studies", study, "tokenize"])?)
        .json(&body);
    print(&runtime()?.block_on(api.write(request))?)
}

/// `coffer detokenize`: the values of field tokens (`null` for unknown ones).
pub(crate) fn detokenize(conn: &Connection, tokens: &[String]) -> Result<()> {
    let api = conn.api(Needs::Reader)?;
    let request = api
        .http
        .post(api.at(&["detokenize"])?)
        .json(&json!({ "tokens": tokens }));
    print(&runtime()?.block_on(api.send(request))?)
}

/// `coffer forget`: deletes everything of one participant (a job).
pub(crate) fn forget(conn: &Connection, study: &str, participant: &str) -> Result<()> {
    let api = conn.api(Needs::Admin)?;
    let request = api
        .http
        .delete(api.at(&["studies", study, "participants", participant])?);
    print(&runtime()?.block_on(api.write(request))?)
}

/// `coffer job`: a job's state and receipt.
pub(crate) fn job(conn: &Connection, id: &str) -> Result<()> {
    let api = conn.api(Needs::Admin)?;
    print(&runtime()?.block_on(api.send(api.http.get(api.at(&["jobs", id])?)))?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn env_file_values_are_read_as_a_shell_reads_them() {
        assert_eq!(super::unquote("'https://x/?a=1&b=2'"), "https://x/?a=1&b=2");
        assert_eq!(super::unquote(r"'it'\''s'"), "it's");
        assert_eq!(super::unquote("plain"), "plain");
    }

    #[test]
    fn ids_stay_one_path_segment() {
        let url = super::endpoint(
            "https://api.example:8443",
            &[
                "studies",
                "std_x",
                "participants",
                "P-001#2?x=%41/b",
                "export",
            ],
        )
        .unwrap();
        assert_eq!(
            url.as_str(),
            "https://api.example:8443/v1/studies/std_x/participants/P-001%232%3Fx=%2541%2Fb/export"
        );
        let behind_a_prefix =
            super::endpoint("https://lb.example/coffer/", &["detokenize"]).unwrap();
        assert_eq!(
            behind_a_prefix.as_str(),
            "https://lb.example/coffer/v1/detokenize"
        );
    }
}
