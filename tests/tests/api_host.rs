//! The public API host (`coffer serve`) end to end, against the contract in
//! API.md: real processes (API host, encryption host, key host on SoftHSM),
//! a metadata cluster and four blob node clusters, all over TLS from one
//! private CA. The tests play outside clients with bearer keys.
//!
//! Every answer any test receives goes through [`common`]: HSTS and an
//! `x-request-id` on successes and errors alike.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coffer_tests::stack::{ApiResponse, ApiStack};
use reqwest::Method;
use serde_json::{Value, json};

const HSTS: &str = "max-age=63072000; includeSubDomains";
const MIB: usize = 1 << 20;

/// Each stack is six Postgres clusters and four processes: at most two at
/// once on a small machine.
static STACKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

async fn slot() -> tokio::sync::SemaphorePermit<'static> {
    STACKS.acquire().await.expect("semaphore")
}

// ---------------------------------------------------------------------------
// Checks every answer goes through

/// HSTS and a non-empty request id, whatever the status.
fn common(r: &ApiResponse) {
    assert_eq!(
        r.header("strict-transport-security"),
        Some(HSTS),
        "HSTS on a {} answer: {}",
        r.status,
        r.text()
    );
    let id = r
        .request_id()
        .unwrap_or_else(|| panic!("no x-request-id on a {} answer: {}", r.status, r.text()));
    assert!(!id.trim().is_empty(), "empty x-request-id");
}

/// The error body: `{"error":{"code","message","request_id"}}`, the code in
/// snake_case, the request id equal to the header. Returns the error object.
fn error_shape(r: &ApiResponse) -> Value {
    common(r);
    let v = r.json();
    let e = v
        .get("error")
        .unwrap_or_else(|| panic!("no `error` in a {} body: {}", r.status, r.text()));
    let code = e["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code: {}", r.text()));
    assert!(
        !code.is_empty()
            && code
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "error.code is snake_case: {code:?}"
    );
    let message = e["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message: {}", r.text()));
    assert!(!message.is_empty(), "empty error.message");
    assert_eq!(
        e["request_id"].as_str(),
        r.request_id(),
        "error.request_id equals the x-request-id header: {}",
        r.text()
    );
    e.clone()
}

/// An error answer with `status`; returns the error object.
#[track_caller]
fn error(r: &ApiResponse, status: u16) -> Value {
    assert_eq!(r.status, status, "expected {status}, got: {}", r.text());
    error_shape(r)
}

/// A success with `status`; returns the JSON body (Null for an empty body).
#[track_caller]
fn ok(r: &ApiResponse, status: u16) -> Value {
    common(r);
    assert_eq!(r.status, status, "expected {status}, got: {}", r.text());
    if r.body.is_empty() {
        Value::Null
    } else {
        r.json()
    }
}

#[track_caller]
fn assert_id(v: &Value, prefix: &str) -> String {
    let id = v
        .as_str()
        .unwrap_or_else(|| panic!("an id with prefix {prefix}, got {v}"));
    assert!(
        id.starts_with(prefix) && id.len() > prefix.len(),
        "{id:?} carries the prefix {prefix}"
    );
    id.to_owned()
}

/// A record token: `rec_` and at least 128 random bits (22 characters even
/// in base64).
#[track_caller]
fn assert_token(v: &Value) -> String {
    let token = assert_id(v, "rec_");
    assert!(
        token.len() - 4 >= 22,
        "{token} holds at least 128 random bits"
    );
    token
}

/// An id of the same shape as `id` that names nothing: its suffix reversed.
fn missing_like(id: &str) -> String {
    let (prefix, suffix) = id.split_at(id.find('_').map_or(0, |i| i + 1));
    let mut reversed: String = suffix.chars().rev().collect();
    if reversed == suffix {
        let mut chars: Vec<char> = suffix.chars().collect();
        chars.rotate_left(1);
        reversed = chars.into_iter().collect();
    }
    format!("{prefix}{reversed}")
}

/// A foreign resource is answered exactly as a missing one: same status and
/// the same bytes except for the request id (and the id the caller sent).
#[track_caller]
fn same_answer(what: &str, foreign: &ApiResponse, f_id: &str, missing: &ApiResponse, m_id: &str) {
    assert!(
        !(200..300).contains(&foreign.status),
        "{what}: a foreign resource was served ({}): {}",
        foreign.status,
        foreign.text()
    );
    assert_eq!(
        foreign.status,
        missing.status,
        "{what}: foreign {} vs missing {}",
        foreign.text(),
        missing.text()
    );
    assert_eq!(
        foreign.header("content-type"),
        missing.header("content-type"),
        "{what}: content type"
    );
    let norm = |r: &ApiResponse, id: &str| {
        r.text()
            .replace(r.request_id().unwrap_or("\u{0}"), "<request id>")
            .replace(id, "<id>")
    };
    assert_eq!(
        norm(foreign, f_id),
        norm(missing, m_id),
        "{what}: a foreign resource's answer is byte-identical to a missing one's"
    );
}

// ---------------------------------------------------------------------------
// Calls (every answer checked by `common`)

async fn get(s: &ApiStack, path: &str, key: Option<&str>) -> ApiResponse {
    let r = s.get(path, key).await;
    common(&r);
    r
}

async fn delete(s: &ApiStack, path: &str, key: Option<&str>) -> ApiResponse {
    let r = s.delete(path, key).await;
    common(&r);
    r
}

async fn post(s: &ApiStack, path: &str, key: Option<&str>, body: &Value) -> ApiResponse {
    let r = s.post_json(path, key, body).await;
    common(&r);
    r
}

async fn put(s: &ApiStack, path: &str, key: Option<&str>, body: &Value) -> ApiResponse {
    let r = s.put_json(path, key, body).await;
    common(&r);
    r
}

async fn raw(
    s: &ApiStack,
    method: Method,
    path: &str,
    key: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> ApiResponse {
    let r = s.raw(method, path, key, content_type, body).await;
    common(&r);
    r
}

async fn call(
    s: &ApiStack,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> ApiResponse {
    let mut request = s.request(method, path, key);
    if let Some(body) = body {
        request = request.json(body);
    }
    let r = s.send(request).await;
    common(&r);
    r
}

// ---------------------------------------------------------------------------
// Set-up helpers (each asserts the contract of the call it makes)

#[derive(Debug)]
struct Tenant {
    id: String,
    admin: String,
}

async fn tenant(s: &ApiStack, name: &str) -> Tenant {
    let v = ok(
        &post(
            s,
            "/v1/tenants",
            Some(&s.operator_key),
            &json!({ "name": name }),
        )
        .await,
        201,
    );
    let id = assert_id(&v["id"], "ten_");
    assert_eq!(v["name"], name);
    let admin = v["admin_key"]
        .as_str()
        .unwrap_or_else(|| panic!("admin_key: {v}"))
        .to_owned();
    assert!(!admin.is_empty());
    Tenant { id, admin }
}

/// Creates an API key; returns (id, secret).
async fn key(s: &ApiStack, admin: &str, body: Value) -> (String, String) {
    let v = ok(&post(s, "/v1/api-keys", Some(admin), &body).await, 201);
    let id = assert_id(&v["id"], "key_");
    let secret = v["secret"]
        .as_str()
        .unwrap_or_else(|| panic!("secret: {v}"))
        .to_owned();
    assert!(!secret.is_empty());
    assert_eq!(v["role"], body["role"], "{v}");
    (id, secret)
}

async fn study(s: &ApiStack, admin: &str, name: &str) -> String {
    let v = ok(
        &post(s, "/v1/studies", Some(admin), &json!({ "name": name })).await,
        201,
    );
    assert_eq!(v["name"], name);
    assert!(v["created_at"].is_string(), "created_at: {v}");
    assert_id(&v["id"], "std_")
}

async fn record(s: &ApiStack, writer: &str, study: &str, participant: &str, data: Value) -> String {
    let v = ok(
        &post(
            s,
            &format!("/v1/studies/{study}/records"),
            Some(writer),
            &json!({ "participant": participant, "kind": "demographics", "data": data }),
        )
        .await,
        201,
    );
    assert_eq!(v["participant"], participant);
    assert_eq!(v["version"], 1);
    assert_token(&v["token"])
}

/// A tenant with one key per role.
#[derive(Debug)]
struct Team {
    tenant: Tenant,
    writer: String,
    reader: String,
    auditor: String,
}

async fn team(s: &ApiStack, name: &str) -> Team {
    let tenant = tenant(s, name).await;
    let writer = key(s, &tenant.admin, json!({ "role": "writer" })).await.1;
    let reader = key(s, &tenant.admin, json!({ "role": "reader" })).await.1;
    let auditor = key(s, &tenant.admin, json!({ "role": "auditor" })).await.1;
    Team {
        tenant,
        writer,
        reader,
        auditor,
    }
}

fn study_ids(v: &Value) -> Vec<String> {
    v["studies"]
        .as_array()
        .unwrap_or_else(|| panic!("{{\"studies\":[...]}}: {v}"))
        .iter()
        .map(|s| s["id"].as_str().expect("study id").to_owned())
        .collect()
}

/// RFC 3339 (UTC, seconds) of a Unix time.
fn rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).expect("days");
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

// ---------------------------------------------------------------------------
// 1. Headers and the error shape

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_has_hsts_and_a_request_id_and_errors_have_one_shape() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    let _slot = slot().await;
    let s = ApiStack::start();

    // Health, without a key.
    let r = get(&s, "/healthz", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&s, "/readyz", None).await;
    assert_eq!(r.status, 200, "every dependency is up: {}", r.text());

    // Successes with a key.
    let t = tenant(&s, "Headers").await;
    ok(&get(&s, "/v1/studies", Some(&t.admin)).await, 200);
    ok(&get(&s, "/v1/api-keys", Some(&t.admin)).await, 200);

    // 404 on an unknown path (with a valid key, so it cannot be a 401).
    error(&get(&s, "/v1/no-such-thing", Some(&t.admin)).await, 404);
    error(&get(&s, "/no/such/path", Some(&t.admin)).await, 404);
    // Without a key: 401 or 404, still the error shape and headers.
    let r = get(&s, "/v1/no-such-thing", None).await;
    assert!(matches!(r.status, 401 | 404), "{}", r.text());
    error_shape(&r);

    // 401 and 403.
    error(&get(&s, "/v1/studies", None).await, 401);
    error(&get(&s, "/v1/studies", Some("garbage")).await, 401);
    error(
        &post(&s, "/v1/tenants", Some(&t.admin), &json!({ "name": "x" })).await,
        403,
    );

    // 400 on malformed JSON.
    error(
        &raw(
            &s,
            Method::POST,
            "/v1/studies",
            Some(&t.admin),
            "application/json",
            b"{\"name\": ".to_vec(),
        )
        .await,
        400,
    );

    // 404 on a missing record, for a role that may read.
    let reader = key(&s, &t.admin, json!({ "role": "reader" })).await.1;
    error(
        &get(
            &s,
            "/v1/records/rec_AAAAAAAAAAAAAAAAAAAAAAAAAA",
            Some(&reader),
        )
        .await,
        404,
    );

    // Request ids are per request.
    let a = get(&s, "/healthz", None).await;
    let b = get(&s, "/healthz", None).await;
    assert_ne!(
        a.request_id(),
        b.request_id(),
        "a fresh request id each time"
    );

    // A known path with a method it does not serve: a 4xx in the error shape.
    let r = call(&s, Method::PATCH, "/v1/studies", Some(&t.admin), None).await;
    assert!((400..500).contains(&r.status), "{}", r.text());
    error_shape(&r);

    // The machine-readable description of the API.
    let r = get(&s, "/v1/openapi.json", None).await;
    let v = ok(&r, 200);
    for path in [
        "/v1/tenants",
        "/v1/api-keys",
        "/v1/studies",
        "/v1/studies/{study}/records",
        "/v1/records/{token}",
    ] {
        assert!(
            v["paths"].get(path).is_some(),
            "openapi.json describes {path}"
        );
    }
}

// ---------------------------------------------------------------------------
// 2 + 3. Tenants, API keys, studies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_api_keys_and_studies() {
    let _slot = slot().await;
    let s = ApiStack::start();
    let t = tenant(&s, "Acme").await;

    // One key per role, each with a name.
    let mut made = Vec::new();
    for role in ["writer", "reader", "auditor", "admin"] {
        let (id, secret) = key(
            &s,
            &t.admin,
            json!({ "role": role, "name": format!("{role} key") }),
        )
        .await;
        made.push((role, id, secret));
    }
    let mut secrets: Vec<&str> = made.iter().map(|m| m.2.as_str()).collect();
    secrets.push(&t.admin);
    secrets.sort_unstable();
    secrets.dedup();
    assert_eq!(secrets.len(), 5, "every secret is different");
    let (writer, reader, auditor, admin2) = (&made[0], &made[1], &made[2], &made[3]);

    // The second admin works as an admin.
    key(&s, &admin2.2, json!({ "role": "reader" })).await;

    // The list: every key, its role and name, no secret.
    let r = get(&s, "/v1/api-keys", Some(&t.admin)).await;
    let v = ok(&r, 200);
    let keys = v["keys"].as_array().unwrap_or_else(|| panic!("keys: {v}"));
    for (role, id, _) in &made {
        let entry = keys
            .iter()
            .find(|k| k["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} listed: {v}"));
        assert_eq!(entry["role"], *role, "{entry}");
        assert_eq!(entry["name"], format!("{role} key"), "{entry}");
        assert!(entry["created_at"].is_string(), "created_at: {entry}");
        for field in ["expires_at", "last_used_at"] {
            assert!(entry.get(field).is_some(), "{field} in {entry}");
        }
        assert!(
            entry.get("secret").is_none(),
            "no secret in the list: {entry}"
        );
    }
    let listing = r.text();
    for secret in &secrets {
        assert!(!listing.contains(secret), "the list never shows a secret");
    }

    // Only admins manage keys; only the operator makes tenants.
    for k in [&writer.2, &reader.2, &auditor.2, &s.operator_key] {
        error(&get(&s, "/v1/api-keys", Some(k)).await, 403);
        error(
            &post(&s, "/v1/api-keys", Some(k), &json!({ "role": "reader" })).await,
            403,
        );
    }
    for k in [&t.admin, &writer.2, &reader.2, &auditor.2] {
        error(
            &post(&s, "/v1/tenants", Some(k), &json!({ "name": "nope" })).await,
            403,
        );
    }
    // An admin cannot mint an operator key, nor an unknown role.
    for role in ["operator", "superuser"] {
        let r = post(&s, "/v1/api-keys", Some(&t.admin), &json!({ "role": role })).await;
        assert!(
            matches!(r.status, 400 | 403 | 422),
            "role {role} refused: {}",
            r.text()
        );
        error_shape(&r);
    }

    // Revocation: the key works, is deleted, then is refused.
    ok(&get(&s, "/v1/studies", Some(&reader.2)).await, 200);
    let r = delete(&s, &format!("/v1/api-keys/{}", reader.1), Some(&t.admin)).await;
    ok(&r, 204);
    assert!(r.body.is_empty(), "204 has no body");
    error(&get(&s, "/v1/studies", Some(&reader.2)).await, 401);
    error(
        &delete(
            &s,
            &format!("/v1/api-keys/{}", missing_like(&writer.1)),
            Some(&t.admin),
        )
        .await,
        404,
    );

    // Missing, unknown, garbage or wrongly presented keys.
    error(&get(&s, "/v1/studies", None).await, 401);
    error(&get(&s, "/v1/studies", Some("")).await, 401);
    error(&get(&s, "/v1/studies", Some("garbage")).await, 401);
    error(
        &get(&s, "/v1/studies", Some(&format!("{}x", writer.2))).await,
        401,
    );
    let mut flipped: Vec<char> = writer.2.chars().collect();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == 'A' { 'B' } else { 'A' };
    let flipped: String = flipped.into_iter().collect();
    error(&get(&s, "/v1/studies", Some(&flipped)).await, 401);
    let r = s
        .send(
            s.request(Method::GET, "/v1/studies", None)
                .header("authorization", format!("Basic {}", writer.2)),
        )
        .await;
    error(&r, 401);

    // Expiry: only a future RFC 3339 time is taken (Postgres alone would
    // also take `now`, `epoch`, `infinity`); a key that expires in a few
    // seconds works until then and is refused after.
    for bad in [
        "2001-01-01T00:00:00Z",
        "now",
        "epoch",
        "infinity",
        "tomorrow",
        "2030-01-01",
        "2030-01-01T00:00:00",
    ] {
        let r = post(
            &s,
            "/v1/api-keys",
            Some(&t.admin),
            &json!({ "role": "reader", "expires_at": bad }),
        )
        .await;
        assert_eq!(error(&r, 400)["code"], "invalid_expires_at", "{bad}");
    }
    let expires = now_secs() + 8;
    let (short_id, short) = key(
        &s,
        &t.admin,
        json!({ "role": "reader", "expires_at": rfc3339(expires) }),
    )
    .await;
    ok(&get(&s, "/v1/studies", Some(&short)).await, 200);
    let v = ok(&get(&s, "/v1/api-keys", Some(&t.admin)).await, 200);
    let entry = v["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["id"] == short_id.as_str())
        .cloned()
        .expect("the short key listed");
    assert!(entry["expires_at"].is_string(), "expires_at: {entry}");
    let wait = (expires + 2).saturating_sub(now_secs());
    tokio::time::sleep(Duration::from_secs(wait)).await;
    error(&get(&s, "/v1/studies", Some(&short)).await, 401);

    // Studies: the admin makes them; every tenant sees only its own.
    let a1 = study(&s, &t.admin, "Cardio").await;
    let a2 = study(&s, &admin2.2, "Renal").await;
    for k in [&writer.2, &auditor.2] {
        error(
            &post(&s, "/v1/studies", Some(k), &json!({ "name": "nope" })).await,
            403,
        );
    }
    error(
        &post(
            &s,
            "/v1/studies",
            Some(&s.operator_key),
            &json!({ "name": "nope" }),
        )
        .await,
        403,
    );
    let other = team(&s, "Other").await;
    let b1 = study(&s, &other.tenant.admin, "Neuro").await;
    assert_ne!(t.id, other.tenant.id);
    for k in [&t.admin, &writer.2, &auditor.2] {
        let ids = study_ids(&ok(&get(&s, "/v1/studies", Some(k)).await, 200));
        assert!(ids.contains(&a1) && ids.contains(&a2), "{ids:?}");
        assert!(!ids.contains(&b1), "another tenant's study listed: {ids:?}");
    }
    for k in [&other.tenant.admin, &other.reader] {
        let ids = study_ids(&ok(&get(&s, "/v1/studies", Some(k)).await, 200));
        assert_eq!(ids, vec![b1.clone()], "only the tenant's own study");
    }
    let v = ok(&get(&s, "/v1/studies", Some(&t.admin)).await, 200);
    let entry = v["studies"]
        .as_array()
        .expect("studies")
        .iter()
        .find(|e| e["id"] == a1.as_str())
        .cloned()
        .expect("a1");
    assert_eq!(entry["name"], "Cardio");

    // Another tenant's admin does not see this tenant's keys.
    let listing = get(&s, "/v1/api-keys", Some(&other.tenant.admin)).await;
    ok(&listing, 200);
    for (_, id, _) in &made {
        assert!(
            !listing.text().contains(id.as_str()),
            "foreign key {id} listed"
        );
    }
}

// ---------------------------------------------------------------------------
// 4. JSON records

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_records_store_read_correct_delete_and_batch() {
    let _slot = slot().await;
    let s = ApiStack::start();
    let team = team(&s, "Records").await;
    let admin = team.tenant.admin.as_str();
    let study_id = study(&s, admin, "Cardio").await;

    let data = json!({
        "name": "Jane Roe",
        "born": "1970-01-02",
        "weight_kg": 61.5,
        "smoker": false,
        "notes": null,
        "visits": [1, 2, {"site": "Zürich ✓"}],
    });
    let r = post(
        &s,
        &format!("/v1/studies/{study_id}/records"),
        Some(&team.writer),
        &json!({ "participant": "P-001", "kind": "demographics", "data": data }),
    )
    .await;
    let v = ok(&r, 201);
    let token = assert_token(&v["token"]);
    assert_eq!(v["participant"], "P-001");
    assert_eq!(v["kind"], "demographics");
    assert_eq!(v["version"], 1);
    assert!(v["created_at"].is_string(), "created_at: {v}");
    assert!(!token.contains("P-001"), "nothing derived from the data");

    let v = ok(
        &get(&s, &format!("/v1/records/{token}"), Some(&team.reader)).await,
        200,
    );
    assert_eq!(v["token"], token.as_str());
    assert_eq!(v["study"], study_id.as_str());
    assert_eq!(v["participant"], "P-001");
    assert_eq!(v["kind"], "demographics");
    assert_eq!(v["version"], 1);
    assert_eq!(v["data"], data);
    assert!(v["created_at"].is_string());

    // A correction: version 2, the new data.
    let corrected = json!({ "name": "Jane Q. Roe", "born": "1970-01-02" });
    let v = ok(
        &put(
            &s,
            &format!("/v1/records/{token}"),
            Some(&team.writer),
            &json!({ "data": corrected }),
        )
        .await,
        200,
    );
    assert_eq!(v["token"], token.as_str());
    assert_eq!(v["version"], 2);
    let v = ok(
        &get(&s, &format!("/v1/records/{token}"), Some(&team.reader)).await,
        200,
    );
    assert_eq!(v["data"], corrected);
    assert_eq!(v["version"], 2);
    assert_eq!(v["participant"], "P-001");
    assert_eq!(v["study"], study_id.as_str());

    // A second record is a different token; both read back.
    let other = record(&s, &team.writer, &study_id, "P-002", json!({ "n": 2 })).await;
    assert_ne!(other, token);

    // Deletion: 204, then 404 for every call on it.
    let r = delete(&s, &format!("/v1/records/{token}"), Some(admin)).await;
    ok(&r, 204);
    assert!(r.body.is_empty());
    error(
        &get(&s, &format!("/v1/records/{token}"), Some(&team.reader)).await,
        404,
    );
    error(
        &put(
            &s,
            &format!("/v1/records/{token}"),
            Some(&team.writer),
            &json!({ "data": { "x": 1 } }),
        )
        .await,
        404,
    );
    error(
        &delete(&s, &format!("/v1/records/{token}"), Some(admin)).await,
        404,
    );
    let v = ok(
        &get(&s, &format!("/v1/records/{other}"), Some(&team.reader)).await,
        200,
    );
    assert_eq!(
        v["data"],
        json!({ "n": 2 }),
        "the other record is untouched"
    );

    // A batch: one result per item, in order; a bad item stops nothing.
    let items = json!({ "records": [
        { "participant": "P-010", "kind": "visit", "data": { "i": 0 } },
        { "participant": "P-011", "kind": "visit" },
        { "participant": "P-012", "data": { "i": 2 } },
        { "participant": "P-013", "kind": "visit", "data": { "i": 3 } },
    ]});
    let v = ok(
        &post(
            &s,
            &format!("/v1/studies/{study_id}/records:batch"),
            Some(&team.writer),
            &items,
        )
        .await,
        200,
    );
    let results = v["results"]
        .as_array()
        .unwrap_or_else(|| panic!("results: {v}"));
    assert_eq!(results.len(), 4, "one result per item: {v}");
    let e = &results[1]["error"];
    assert!(
        e["code"].is_string() && e["message"].is_string(),
        "item 1 fails: {v}"
    );
    assert!(
        results[1].get("token").is_none(),
        "no token for a failed item"
    );
    let mut tokens = Vec::new();
    for i in [0usize, 2, 3] {
        assert!(results[i].get("error").is_none(), "item {i}: {v}");
        let token = assert_token(&results[i]["token"]);
        let got = ok(
            &get(&s, &format!("/v1/records/{token}"), Some(&team.reader)).await,
            200,
        );
        assert_eq!(got["data"], json!({ "i": i }), "item {i} in order");
        assert_eq!(got["participant"], format!("P-01{i}"));
        assert_eq!(got["study"], study_id.as_str());
        assert_eq!(got["version"], 1);
        tokens.push(token);
    }
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 3, "distinct tokens");
}

// ---------------------------------------------------------------------------
// 5. Bad input: refused, not echoed, nothing stored

/// `count` (a `SELECT count(*)` of `table`) summed over every blob node,
/// 0 on a node that has no such table yet; the encryption host is the only
/// writer of the nodes.
async fn node_rows(s: &ApiStack, table: &str, count: &'static str) -> i64 {
    let mut total = 0;
    for node in &s.path.nodes {
        let url = s.path.infra.verified_url(node);
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .expect("blob node");
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&mut conn)
            .await
            .expect("query");
        if exists {
            let n: i64 = sqlx::query_scalar(count)
                .fetch_one(&mut conn)
                .await
                .expect("count");
            total += n;
        }
    }
    total
}

/// Live blob headers over every node: each stored record (or version) adds
/// one per replica.
async fn blob_rows(s: &ApiStack) -> i64 {
    node_rows(s, "blobs", "SELECT count(*) FROM blobs").await
}

/// The blob row count once it has not moved for a second (the replica
/// beyond W may land just after the answer).
async fn settled_blob_rows(s: &ApiStack) -> i64 {
    let mut last = blob_rows(s).await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = blob_rows(s).await;
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_without_echo_and_nothing_is_stored() {
    let _slot = slot().await;
    let s = ApiStack::start();
    let team = team(&s, "Bad input").await;
    let study_id = study(&s, &team.tenant.admin, "Cardio").await;
    let records = format!("/v1/studies/{study_id}/records");
    let batch = format!("/v1/studies/{study_id}/records:batch");
    let participant = format!("P-BAD-{}", coffer_tests::random_hex());
    let marker = format!(
        "MARKER{}{}",
        coffer_tests::random_hex(),
        coffer_tests::random_hex()
    );
    let w = Some(team.writer.as_str());

    // Calibration: one good record adds rows, so the count would see a
    // stored bad one.
    let zero = settled_blob_rows(&s).await;
    let good = record(
        &s,
        &team.writer,
        &study_id,
        &participant,
        json!({ "v": "good" }),
    )
    .await;
    let before = settled_blob_rows(&s).await;
    assert!(
        before - zero >= 3,
        "a record is on at least W = 3 nodes ({zero} → {before})"
    );

    let mut refused: Vec<(&str, ApiResponse)> = Vec::new();

    // Malformed JSON: 400.
    let body = format!(r#"{{"participant":"{participant}","data":{{"secret":"{marker}"#);
    let r = raw(
        &s,
        Method::POST,
        &records,
        w,
        "application/json",
        body.into_bytes(),
    )
    .await;
    error(&r, 400);
    refused.push(("malformed JSON", r));

    // Valid JSON under the wrong content type: 415.
    let body = json!({ "participant": participant, "data": { "secret": marker } });
    let r = raw(
        &s,
        Method::POST,
        &records,
        w,
        "text/plain",
        body.to_string().into_bytes(),
    )
    .await;
    error(&r, 415);
    refused.push(("text/plain", r));

    // Over 1 MiB: 413.
    let big = json!({
        "participant": participant,
        "data": { "secret": marker, "pad": "x".repeat(MIB + 1) },
    });
    let r = raw(
        &s,
        Method::POST,
        &records,
        w,
        "application/json",
        big.to_string().into_bytes(),
    )
    .await;
    error(&r, 413);
    refused.push(("body over 1 MiB", r));

    // Well-formed JSON of the wrong shape: 400 or 422, and the value not
    // quoted back (serde's "invalid type: string \"...\"" would).
    for (what, body) in [
        (
            "data is a string",
            json!({ "participant": participant, "data": marker }),
        ),
        ("no participant", json!({ "data": { "secret": marker } })),
        (
            "no data",
            json!({ "participant": participant, "kind": marker }),
        ),
        (
            "participant is a number",
            json!({ "participant": 7, "data": { "secret": marker } }),
        ),
    ] {
        let r = post(&s, &records, w, &body).await;
        assert!(matches!(r.status, 400 | 422), "{what}: {}", r.text());
        error_shape(&r);
        refused.push((what, r));
    }

    // A batch whose only item is bad: 200, the item's error, no echo.
    let r = post(
        &s,
        &batch,
        w,
        &json!({ "records": [{ "participant": participant, "data": marker }] }),
    )
    .await;
    let v = ok(&r, 200);
    assert!(v["results"][0]["error"]["code"].is_string(), "{v}");
    refused.push(("batch with a bad item", r));

    // Batches over the limits: 413, nothing stored (not even the good items).
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({ "participant": participant, "data": { "i": i, "secret": marker } }))
        .collect();
    let r = post(&s, &batch, w, &json!({ "records": many })).await;
    error(&r, 413);
    refused.push(("batch of 1,001 items", r));
    let r = post(&s, &batch, w, &json!({ "records": [big] })).await;
    error(&r, 413);
    refused.push(("batch over 1 MiB", r));

    // A correction with bad input: refused, the record unchanged.
    let one = format!("/v1/records/{good}");
    let r = raw(
        &s,
        Method::PUT,
        &one,
        w,
        "application/json",
        format!(r#"{{"data":{{"s":"{marker}"#).into_bytes(),
    )
    .await;
    error(&r, 400);
    refused.push(("malformed correction", r));
    let r = raw(
        &s,
        Method::PUT,
        &one,
        w,
        "text/plain",
        json!({ "data": { "s": marker } }).to_string().into_bytes(),
    )
    .await;
    error(&r, 415);
    refused.push(("text/plain correction", r));
    let r = raw(
        &s,
        Method::PUT,
        &one,
        w,
        "application/json",
        json!({ "data": { "s": marker, "pad": "x".repeat(MIB + 1) } })
            .to_string()
            .into_bytes(),
    )
    .await;
    error(&r, 413);
    refused.push(("correction over 1 MiB", r));
    let r = put(&s, &one, w, &json!({ "data": marker })).await;
    assert!(matches!(r.status, 400 | 422), "{}", r.text());
    error_shape(&r);
    refused.push(("correction data is a string", r));

    for (what, r) in &refused {
        assert!(
            !r.text().contains(&marker),
            "{what}: the answer echoes a record value: {}",
            r.text()
        );
    }

    // Nothing stored: no new ciphertext, the record still at version 1.
    let after = settled_blob_rows(&s).await;
    assert_eq!(after, before, "the refused requests stored nothing");
    let v = ok(&get(&s, &one, Some(&team.reader)).await, 200);
    assert_eq!(v["version"], 1, "{v}");
    assert_eq!(v["data"], json!({ "v": "good" }));

    // And the count does move for a good one.
    record(
        &s,
        &team.writer,
        &study_id,
        &participant,
        json!({ "v": "good 2" }),
    )
    .await;
    assert!(settled_blob_rows(&s).await >= before + 3);
}

/// Chunk rows over every blob node (a refused upload must leave none).
async fn chunk_rows(s: &ApiStack) -> i64 {
    node_rows(s, "blob_chunks", "SELECT count(*) FROM blob_chunks").await
}

/// A body sent chunked (no `Content-Length`), as `pieces` of `piece` bytes.
fn chunked(pieces: usize, piece: usize) -> reqwest::Body {
    let chunks = (0..pieces).map(move |i| Ok::<_, std::io::Error>(vec![i as u8; piece]));
    reqwest::Body::wrap_stream(futures::stream::iter(chunks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_limits_and_malformed_paths_are_refused_and_store_nothing() {
    let _slot = slot().await;
    let s = ApiStack::start_with(&[
        "--max-json-bytes",
        "4096",
        "--max-items",
        "3",
        "--max-blob-bytes",
        "1048576",
    ]);
    let team = team(&s, "Limits").await;
    let study_id = study(&s, &team.tenant.admin, "Small").await;
    let w = Some(team.writer.as_str());
    let records = format!("/v1/studies/{study_id}/records");
    let blobs = format!("/v1/studies/{study_id}/blobs?participant=P-1");
    let good = record(&s, &team.writer, &study_id, "P-1", json!({ "v": 1 })).await;
    let (rows, chunks) = (settled_blob_rows(&s).await, chunk_rows(&s).await);

    // JSON over the configured 4 KiB: 413, naming the limit.
    let pad = "x".repeat(5000);
    let e = error(
        &post(
            &s,
            &records,
            w,
            &json!({ "participant": "P-1", "data": { "pad": pad } }),
        )
        .await,
        413,
    );
    assert_eq!(e["code"], "too_large");
    assert!(e["message"].as_str().unwrap_or("").contains("4096"), "{e}");
    // Items over the configured 3: 413 for a batch, a tokenize and a
    // detokenize call; 3 are fine.
    let item = json!({ "participant": "P-1", "data": { "i": 1 } });
    let batch = format!("/v1/studies/{study_id}/records:batch");
    let four = json!({ "records": [item, item, item, item] });
    error(&post(&s, &batch, w, &four).await, 413);
    let fields = json!({ "fields": { "a": "1", "b": "2", "c": "3", "d": "4" } });
    error(&tokenize(&s, &team.writer, &study_id, fields).await, 413);
    let tokens = json!({ "tokens": ["tok_a", "tok_b", "tok_c", "tok_d"] });
    error(
        &post(&s, "/v1/detokenize", Some(&team.reader), &tokens).await,
        413,
    );
    let three = json!({ "records": [item, item, item] });
    let v = ok(&post(&s, &batch, w, &three).await, 200);
    assert!(
        v["results"]
            .as_array()
            .expect("results")
            .iter()
            .all(|r| r["token"].is_string()),
        "{v}"
    );
    let rows = settled_blob_rows(&s).await.max(rows);
    let chunks = chunk_rows(&s).await.max(chunks);

    // A BLOB over the configured 1 MiB: 413 whether its length is declared
    // or it is sent chunked (the API host stops the stream, the encryption
    // host rolls back), and nothing is stored on any node.
    let declared = raw(&s, Method::PUT, &blobs, w, "image/png", vec![7; MIB + 1]).await;
    assert_eq!(error(&declared, 413)["code"], "too_large");
    for key in [None, Some("limits-chunked")] {
        let mut request = s
            .request(Method::PUT, &blobs, w)
            .header("content-type", "image/png")
            .body(chunked(24, 64 * 1024));
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let r = s.send(request).await;
        common(&r);
        assert_eq!(error(&r, 413)["code"], "too_large", "{key:?}");
    }
    assert_eq!(
        settled_blob_rows(&s).await,
        rows,
        "a refused BLOB left headers"
    );
    assert_eq!(chunk_rows(&s).await, chunks, "a refused BLOB left chunks");
    let meta_url = s.path.infra.verified_url(&s.meta);
    let mut meta = <sqlx::PgConnection as sqlx::Connection>::connect(&meta_url)
        .await
        .expect("meta DB");
    let (listed,): (i64,) = sqlx::query_as("SELECT count(*) FROM blobs")
        .fetch_one(&mut meta)
        .await
        .expect("count");
    assert_eq!(listed, 0, "a refused BLOB was recorded");
    // Under the limit, chunked, it is stored; the idempotency key of the
    // refused upload is free again.
    let r = s
        .send(
            s.request(Method::PUT, &blobs, w)
                .header("content-type", "image/png")
                .header("idempotency-key", "limits-chunked")
                .body(chunked(8, 64 * 1024)),
        )
        .await;
    assert_eq!(ok(&r, 201)["size"], 8 * 64 * 1024);

    // Malformed paths and queries get the error shape too.
    let not_utf8 = [
        (Method::GET, "/v1/records/%FF%FE".to_owned()),
        (Method::GET, "/v1/blobs/%C3%28".to_owned()),
        (Method::POST, "/v1/studies/%FF/records".to_owned()),
    ];
    for (method, path) in not_utf8 {
        let r = call(&s, method, &path, w, Some(&item)).await;
        assert_eq!(error(&r, 400)["code"], "invalid_path", "{path}");
    }
    for query in ["", "?participant=P-1&participant=P-2", "?who=P-1"] {
        let path = format!("/v1/studies/{study_id}/blobs{query}");
        let r = raw(&s, Method::PUT, &path, w, "image/png", vec![1, 2, 3]).await;
        assert_eq!(error(&r, 400)["code"], "invalid_query", "{query}");
    }
    ok(
        &get(&s, &format!("/v1/records/{good}"), Some(&team.reader)).await,
        200,
    );
}

// ---------------------------------------------------------------------------
// 6. Authorization matrix

/// The bytes of every BLOB the matrix stores, and their content type.
const MATRIX_BLOB: &[u8] = b"matrix blob \x00\x01\x02\xff bytes";
const MATRIX_BLOB_TYPE: &str = "application/x-matrix";
/// The value behind tenant A's field tokens, and behind tenant B's.
const A_VALUE: &str = "value-of-tenant-A";
const B_VALUE: &str = "value-of-tenant-B";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// A record (a fresh one for each call when `fresh`).
    Record,
    /// A study (a fresh one for each call when `fresh`).
    Study,
    /// An API key (always a fresh one).
    Key,
    /// A BLOB (a fresh one for each call when `fresh`).
    Blob,
    /// A field token (named in the body, not the path).
    FieldToken,
    /// A job (queued by a study deletion).
    Job,
    /// A tenant. For tenant roles: their own tenant, and the other tenant as
    /// the foreign one. For the operator (no tenant of its own): a fresh
    /// tenant each call, and an already deleted tenant in the foreign column.
    Tenant,
}

/// How a resource of another tenant is answered to a role that may make the
/// call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hidden {
    /// 404, the same bytes as a missing resource.
    NotFound,
    /// 200 with the item mapped to `null` (detokenize): the same bytes as for
    /// a missing token but for the token itself.
    Null,
}

/// A request body.
#[derive(Debug)]
enum Payload {
    Empty,
    Json(Value),
    /// Raw bytes with a content type.
    Raw(&'static str, &'static [u8]),
}

#[derive(Debug)]
struct Case {
    what: &'static str,
    method: Method,
    path: fn(&str) -> String,
    body: fn(&str) -> Payload,
    target: Target,
    /// A fresh own resource for each call (the call may consume it).
    fresh: bool,
    /// The roles that may make the call; every other tenant role gets 403.
    allowed: &'static [&'static str],
    ok_status: u16,
    /// Checks an allowed call's answer about the caller's own resource.
    check: fn(&ApiResponse, &str),
    hidden: Hidden,
    /// What the operator gets when it may not make the call.
    operator_denied: u16,
}

/// The defaults the cases override.
const CASE: Case = Case {
    what: "",
    method: Method::GET,
    path: |_| String::new(),
    body: |_| Payload::Empty,
    target: Target::Study,
    fresh: false,
    allowed: &[],
    ok_status: 200,
    check: |_, _| {},
    hidden: Hidden::NotFound,
    operator_denied: 403,
};

async fn send_case(s: &ApiStack, case: &Case, caller: &str, id: &str) -> ApiResponse {
    let path = (case.path)(id);
    match (case.body)(id) {
        Payload::Empty => call(s, case.method.clone(), &path, Some(caller), None).await,
        Payload::Json(body) => call(s, case.method.clone(), &path, Some(caller), Some(&body)).await,
        Payload::Raw(content_type, bytes) => {
            raw(
                s,
                case.method.clone(),
                &path,
                Some(caller),
                content_type,
                bytes.to_vec(),
            )
            .await
        }
    }
}

/// Why an answer about another tenant's resource counts as a success (a
/// 2xx, or for detokenize a value that is not `null`), if it does.
fn cross_tenant_success(r: &ApiResponse, id: &str, null_hidden: bool) -> Option<String> {
    if !(200..300).contains(&r.status) {
        return None;
    }
    if null_hidden {
        let v: Option<Value> = serde_json::from_slice(&r.body).ok();
        let value = v.as_ref().and_then(|v| v.get("values")?.get(id));
        if value == Some(&Value::Null) && !r.text().contains(B_VALUE) {
            return None;
        }
    }
    Some(format!("{} {}", r.status, r.text()))
}

/// Detokenize: a foreign token is answered exactly as a missing one, 200
/// with the token mapped to `null`; the same bytes but for the token.
#[track_caller]
fn same_null_answer(
    what: &str,
    foreign: &ApiResponse,
    f_id: &str,
    missing: &ApiResponse,
    m_id: &str,
) {
    for (r, id) in [(foreign, f_id), (missing, m_id)] {
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_eq!(
            r.json(),
            json!({ "values": { id: null } }),
            "{what}: the token maps to null"
        );
    }
    assert_eq!(
        foreign.header("content-type"),
        missing.header("content-type"),
        "{what}: content type"
    );
    assert_eq!(
        foreign.text().replace(f_id, "<token>"),
        missing.text().replace(m_id, "<token>"),
        "{what}: a foreign token's answer is byte-identical to a missing one's"
    );
}

/// Stores [`MATRIX_BLOB`] for `participant`; returns its token.
async fn matrix_blob(s: &ApiStack, writer: &str, study: &str, participant: &str) -> String {
    let r = raw(
        s,
        Method::PUT,
        &format!("/v1/studies/{study}/blobs?participant={participant}"),
        Some(writer),
        MATRIX_BLOB_TYPE,
        MATRIX_BLOB.to_vec(),
    )
    .await;
    assert_id(&ok(&r, 201)["token"], "blb_")
}

/// Tokenizes `value` for `participant`; returns its `tok_` token.
async fn matrix_field(
    s: &ApiStack,
    writer: &str,
    study: &str,
    participant: &str,
    value: &str,
) -> String {
    let body = json!({ "participant": participant, "fields": { "f": value } });
    field_token(
        &ok(&tokenize(s, writer, study, body).await, 200),
        "f",
        "tok_",
    )
}

/// Creates and deletes a study of the admin's tenant; returns the job.
async fn study_deletion_job(s: &ApiStack, admin: &str, name: &str) -> String {
    let id = study(s, admin, name).await;
    let v = ok(
        &delete(s, &format!("/v1/studies/{id}"), Some(admin)).await,
        202,
    );
    assert_id(&v["job"], "job_")
}

/// A GET of a BLOB answered with its bytes.
#[track_caller]
fn blob_served(r: &ApiResponse) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some(MATRIX_BLOB_TYPE));
    assert_eq!(r.body.as_ref(), MATRIX_BLOB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_roles_tenants_and_study_limits() {
    let _slot = slot().await;
    let s = ApiStack::start();
    let a = team(&s, "Tenant A").await;
    let b = team(&s, "Tenant B").await;
    let a1 = study(&s, &a.tenant.admin, "A one").await;
    let a2 = study(&s, &a.tenant.admin, "A two").await;
    let b1 = study(&s, &b.tenant.admin, "B one").await;
    let ra = record(&s, &a.writer, &a1, "P-A", json!({ "who": "a" })).await;
    let ra2 = record(&s, &a.writer, &a2, "P-A2", json!({ "who": "a2" })).await;
    let rb = record(&s, &b.writer, &b1, "P-B", json!({ "who": "b" })).await;
    let (kb_id, kb) = key(&s, &b.tenant.admin, json!({ "role": "reader" })).await;
    let ba = matrix_blob(&s, &a.writer, &a1, "P-1").await;
    let ba2 = matrix_blob(&s, &a.writer, &a2, "P-A2").await;
    let bb = matrix_blob(&s, &b.writer, &b1, "P-B").await;
    let ta = matrix_field(&s, &a.writer, &a1, "P-1", A_VALUE).await;
    let ta2 = matrix_field(&s, &a.writer, &a2, "P-A2", A_VALUE).await;
    let tb = matrix_field(&s, &b.writer, &b1, "P-B", B_VALUE).await;
    let ja = study_deletion_job(&s, &a.tenant.admin, "A doomed").await;
    let jb = study_deletion_job(&s, &b.tenant.admin, "B doomed").await;
    // A deleted tenant, and the job deleting it.
    let gone = tenant(&s, "Gone").await;
    let gone_job = assert_id(
        &ok(
            &delete(
                &s,
                &format!("/v1/tenants/{}", gone.id),
                Some(&s.operator_key),
            )
            .await,
            202,
        )["job"],
        "job_",
    );
    // Shredded to the end: asked for again it is gone (while unfinished, it
    // would answer its job, the way to queue a failed deletion again).
    {
        let _worker = s.start_worker();
        let done = finished_job(&s, &gone_job, &s.operator_key).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }

    let callers: [(&str, &str); 5] = [
        ("operator", &s.operator_key),
        ("admin", &a.tenant.admin),
        ("writer", &a.writer),
        ("reader", &a.reader),
        ("auditor", &a.auditor),
    ];
    let cases = [
        Case {
            what: "read a record",
            path: |id| format!("/v1/records/{id}"),
            target: Target::Record,
            allowed: &["reader"],
            check: |r, id| {
                let v = r.json();
                assert_eq!(v["token"], id, "{v}");
                assert!(v["data"].is_object(), "{v}");
            },
            ..CASE
        },
        Case {
            what: "correct a record",
            method: Method::PUT,
            path: |id| format!("/v1/records/{id}"),
            body: |_| Payload::Json(json!({ "data": { "corrected": true } })),
            target: Target::Record,
            allowed: &["writer"],
            check: |r, id| {
                let v = r.json();
                assert_eq!(v["token"], id, "{v}");
                assert_eq!(v["version"], 2, "{v}");
            },
            ..CASE
        },
        Case {
            what: "delete a record",
            method: Method::DELETE,
            path: |id| format!("/v1/records/{id}"),
            target: Target::Record,
            fresh: true,
            allowed: &["admin"],
            ok_status: 204,
            check: |r, _| assert!(r.body.is_empty(), "{}", r.text()),
            ..CASE
        },
        Case {
            what: "store a record",
            method: Method::POST,
            path: |id| format!("/v1/studies/{id}/records"),
            body: |_| {
                Payload::Json(json!({ "participant": "P-M", "kind": "k", "data": { "x": 1 } }))
            },
            allowed: &["writer"],
            ok_status: 201,
            check: |r, _| {
                assert_token(&r.json()["token"]);
            },
            ..CASE
        },
        Case {
            what: "store a batch",
            method: Method::POST,
            path: |id| format!("/v1/studies/{id}/records:batch"),
            body: |_| {
                Payload::Json(json!({ "records": [{ "participant": "P-M", "data": { "x": 1 } }] }))
            },
            allowed: &["writer"],
            check: |r, _| {
                assert_token(&r.json()["results"][0]["token"]);
            },
            ..CASE
        },
        Case {
            what: "revoke a key",
            method: Method::DELETE,
            path: |id| format!("/v1/api-keys/{id}"),
            target: Target::Key,
            fresh: true,
            allowed: &["admin"],
            ok_status: 204,
            check: |r, _| assert!(r.body.is_empty(), "{}", r.text()),
            ..CASE
        },
        Case {
            what: "store a BLOB",
            method: Method::PUT,
            path: |id| format!("/v1/studies/{id}/blobs?participant=P-1"),
            body: |_| Payload::Raw(MATRIX_BLOB_TYPE, MATRIX_BLOB),
            allowed: &["writer"],
            ok_status: 201,
            check: |r, _| {
                let v = r.json();
                assert_id(&v["token"], "blb_");
                assert_eq!(v["size"], MATRIX_BLOB.len(), "{v}");
                assert_eq!(v["content_type"], MATRIX_BLOB_TYPE, "{v}");
            },
            ..CASE
        },
        Case {
            what: "read a BLOB",
            path: |id| format!("/v1/blobs/{id}"),
            target: Target::Blob,
            allowed: &["reader"],
            check: |r, _| blob_served(r),
            ..CASE
        },
        Case {
            what: "delete a BLOB",
            method: Method::DELETE,
            path: |id| format!("/v1/blobs/{id}"),
            target: Target::Blob,
            fresh: true,
            allowed: &["admin"],
            ok_status: 204,
            check: |r, _| assert!(r.body.is_empty(), "{}", r.text()),
            ..CASE
        },
        Case {
            what: "tokenize fields",
            method: Method::POST,
            path: |id| format!("/v1/studies/{id}/tokenize"),
            body: |_| Payload::Json(json!({ "participant": "P-1", "fields": { "a": "b" } })),
            allowed: &["writer"],
            check: |r, _| {
                assert_id(&r.json()["fields"]["a"], "tok_");
            },
            ..CASE
        },
        Case {
            what: "detokenize",
            method: Method::POST,
            path: |_| "/v1/detokenize".to_owned(),
            body: |id| Payload::Json(json!({ "tokens": [id] })),
            target: Target::FieldToken,
            allowed: &["reader"],
            check: |r, id| assert_eq!(r.json(), json!({ "values": { id: A_VALUE } })),
            hidden: Hidden::Null,
            ..CASE
        },
        Case {
            what: "export a participant",
            path: |id| format!("/v1/studies/{id}/participants/P-1/export"),
            allowed: &["reader"],
            check: |r, _| {
                let v = r.json();
                assert_eq!(v["participant"], "P-1", "{v}");
                assert!(v["records"].is_array(), "{v}");
                let blobs = v["blobs"].as_array().expect("blobs");
                assert!(
                    blobs
                        .iter()
                        .any(|b| b["content_type"] == MATRIX_BLOB_TYPE
                            && b["size"] == MATRIX_BLOB.len()),
                    "{v}"
                );
                let fields = v["fields"].as_array().expect("fields");
                assert!(fields.iter().any(|f| f["value"] == A_VALUE), "{v}");
                assert!(!r.text().contains(B_VALUE), "{v}");
            },
            ..CASE
        },
        Case {
            what: "delete a participant",
            method: Method::DELETE,
            path: |id| format!("/v1/studies/{id}/participants/P-Del"),
            allowed: &["admin"],
            ok_status: 202,
            check: |r, _| {
                assert_id(&r.json()["job"], "job_");
            },
            ..CASE
        },
        Case {
            what: "delete a study",
            method: Method::DELETE,
            path: |id| format!("/v1/studies/{id}"),
            fresh: true,
            allowed: &["admin"],
            ok_status: 202,
            check: |r, _| {
                assert_id(&r.json()["job"], "job_");
            },
            ..CASE
        },
        Case {
            what: "read a job",
            path: |id| format!("/v1/jobs/{id}"),
            target: Target::Job,
            allowed: &["admin", "writer", "reader", "auditor"],
            check: |r, id| {
                let v = r.json();
                assert_eq!(v["id"], id, "{v}");
                assert_eq!(v["kind"], "delete_study", "{v}");
                assert!(
                    ["queued", "running", "succeeded", "failed"]
                        .contains(&v["state"].as_str().unwrap_or("")),
                    "{v}"
                );
            },
            // The operator follows tenant deletions only; a tenant's other
            // jobs do not exist for it.
            operator_denied: 404,
            ..CASE
        },
        Case {
            what: "delete a tenant",
            method: Method::DELETE,
            path: |id| format!("/v1/tenants/{id}"),
            target: Target::Tenant,
            fresh: true,
            allowed: &["operator"],
            ok_status: 202,
            check: |r, _| {
                assert_id(&r.json()["job"], "job_");
            },
            ..CASE
        },
    ];

    // Every foreign probe; those that succeeded (must stay empty).
    let mut probes = 0usize;
    let mut cross_tenant_successes: Vec<String> = Vec::new();
    for case in &cases {
        for (role, caller) in callers {
            let what = format!("{} as {role}", case.what);
            let operator = role == "operator";
            let own = match (case.target, case.fresh) {
                (Target::Record, true) => {
                    record(&s, &a.writer, &a1, "P-F", json!({ "fresh": true })).await
                }
                (Target::Record, false) => ra.clone(),
                (Target::Study, true) => study(&s, &a.tenant.admin, "A fresh").await,
                (Target::Study, false) => a1.clone(),
                (Target::Key, _) => {
                    key(&s, &a.tenant.admin, json!({ "role": "reader" }))
                        .await
                        .0
                }
                (Target::Blob, true) => matrix_blob(&s, &a.writer, &a1, "P-F").await,
                (Target::Blob, false) => ba.clone(),
                (Target::FieldToken, _) => ta.clone(),
                (Target::Job, _) => ja.clone(),
                (Target::Tenant, _) if operator => tenant(&s, "Fresh").await.id,
                (Target::Tenant, _) => a.tenant.id.clone(),
            };
            let foreign = match case.target {
                Target::Record => rb.clone(),
                Target::Study => b1.clone(),
                Target::Key => kb_id.clone(),
                Target::Blob => bb.clone(),
                Target::FieldToken => tb.clone(),
                Target::Job => jb.clone(),
                Target::Tenant if operator => gone.id.clone(),
                Target::Tenant => b.tenant.id.clone(),
            };
            let missing = missing_like(&own);
            let allowed = case.allowed.contains(&role);
            let null_hidden = allowed && case.hidden == Hidden::Null;
            let r_foreign = send_case(&s, case, caller, &foreign).await;
            let r_missing = send_case(&s, case, caller, &missing).await;
            probes += 1;
            let leak = cross_tenant_success(&r_foreign, &foreign, null_hidden);
            if let Some(leak) = &leak {
                cross_tenant_successes.push(format!("{what}: {leak}"));
            } else if null_hidden {
                same_null_answer(&what, &r_foreign, &foreign, &r_missing, &missing);
            } else {
                same_answer(&what, &r_foreign, &foreign, &r_missing, &missing);
            }
            let r_own = send_case(&s, case, caller, &own).await;
            if allowed {
                assert_eq!(
                    r_own.status,
                    case.ok_status,
                    "{what}: expected {}, got: {}",
                    case.ok_status,
                    r_own.text()
                );
                (case.check)(&r_own, &own);
                if case.hidden == Hidden::NotFound && leak.is_none() {
                    error(&r_foreign, 404);
                    error(&r_missing, 404);
                }
            } else {
                let denied = if operator { case.operator_denied } else { 403 };
                let e = error(&r_own, denied);
                assert!(e["code"].is_string(), "{what}: wrong role is {denied}");
            }
        }
    }
    assert_eq!(
        probes,
        cases.len() * callers.len(),
        "every case, every role"
    );
    assert!(
        cross_tenant_successes.is_empty(),
        "zero cross-tenant successes, got {}: {cross_tenant_successes:#?}",
        cross_tenant_successes.len()
    );

    // Tenant-level calls: only the right role.
    for (role, caller) in callers {
        let r = post(&s, "/v1/studies", Some(caller), &json!({ "name": "x" })).await;
        if role == "admin" {
            ok(&r, 201);
        } else {
            error(&r, 403);
        }
        let r = post(
            &s,
            "/v1/api-keys",
            Some(caller),
            &json!({ "role": "reader" }),
        )
        .await;
        if role == "admin" {
            ok(&r, 201);
        } else {
            error(&r, 403);
        }
        let r = get(&s, "/v1/api-keys", Some(caller)).await;
        if role == "admin" {
            let listing = ok(&r, 200);
            assert!(!listing.to_string().contains(&kb_id), "foreign key listed");
        } else {
            error(&r, 403);
        }
        let r = post(&s, "/v1/tenants", Some(caller), &json!({ "name": "x" })).await;
        if role == "operator" {
            ok(&r, 201);
        } else {
            error(&r, 403);
        }
        let r = get(&s, "/v1/studies", Some(caller)).await;
        if role == "operator" {
            error(&r, 403);
        } else {
            let ids = study_ids(&ok(&r, 200));
            assert!(ids.contains(&a1) && !ids.contains(&b1), "{role}: {ids:?}");
        }
    }

    // The operator follows the tenant deletions it started; tenant roles do
    // not see them (as a missing job); the deleted tenant's keys are refused.
    let v = ok(
        &get(&s, &format!("/v1/jobs/{gone_job}"), Some(&s.operator_key)).await,
        200,
    );
    assert_eq!(v["id"], gone_job.as_str(), "{v}");
    assert_eq!(v["kind"], "delete_tenant", "{v}");
    let m_id = missing_like(&gone_job);
    error(
        &get(&s, &format!("/v1/jobs/{m_id}"), Some(&s.operator_key)).await,
        404,
    );
    for (role, caller) in &callers[1..] {
        let f = get(&s, &format!("/v1/jobs/{gone_job}"), Some(caller)).await;
        let m = get(&s, &format!("/v1/jobs/{m_id}"), Some(caller)).await;
        error(&f, 404);
        same_answer(
            &format!("{role} reads another tenant's deletion job"),
            &f,
            &gone_job,
            &m,
            &m_id,
        );
    }
    error(&get(&s, "/v1/studies", Some(&gone.admin)).await, 401);

    // Keys limited to study A1: the tenant's other study is not allowed
    // (403: a valid key, not allowed); another tenant's study is not
    // visible (404, as a missing one).
    let w1 = key(
        &s,
        &a.tenant.admin,
        json!({ "role": "writer", "studies": [a1] }),
    )
    .await
    .1;
    let r1 = key(
        &s,
        &a.tenant.admin,
        json!({ "role": "reader", "studies": [a1] }),
    )
    .await
    .1;
    let ad1 = key(
        &s,
        &a.tenant.admin,
        json!({ "role": "admin", "studies": [a1] }),
    )
    .await
    .1;
    let body = json!({ "participant": "P-L", "data": { "l": 1 } });
    ok(
        &post(&s, &format!("/v1/studies/{a1}/records"), Some(&w1), &body).await,
        201,
    );
    error(
        &post(&s, &format!("/v1/studies/{a2}/records"), Some(&w1), &body).await,
        403,
    );
    error(
        &post(
            &s,
            &format!("/v1/studies/{a2}/records:batch"),
            Some(&w1),
            &json!({ "records": [body] }),
        )
        .await,
        403,
    );
    let f = post(&s, &format!("/v1/studies/{b1}/records"), Some(&w1), &body).await;
    let m_id = missing_like(&a1);
    let m = post(&s, &format!("/v1/studies/{m_id}/records"), Some(&w1), &body).await;
    error(&f, 404);
    same_answer("limited writer, foreign study", &f, &b1, &m, &m_id);
    error(
        &put(
            &s,
            &format!("/v1/records/{ra2}"),
            Some(&w1),
            &json!({ "data": { "no": 1 } }),
        )
        .await,
        403,
    );
    // BLOBs and field tokens of the limited writer.
    matrix_blob(&s, &w1, &a1, "P-L").await;
    let put_blob = async |study: &str| {
        raw(
            &s,
            Method::PUT,
            &format!("/v1/studies/{study}/blobs?participant=P-L"),
            Some(&w1),
            MATRIX_BLOB_TYPE,
            MATRIX_BLOB.to_vec(),
        )
        .await
    };
    error(&put_blob(&a2).await, 403);
    let f = put_blob(&b1).await;
    let m = put_blob(&m_id).await;
    error(&f, 404);
    same_answer(
        "limited writer stores a BLOB in a foreign study",
        &f,
        &b1,
        &m,
        &m_id,
    );
    let fields = json!({ "participant": "P-L", "fields": { "l": "v" } });
    ok(&tokenize(&s, &w1, &a1, fields.clone()).await, 200);
    error(&tokenize(&s, &w1, &a2, fields.clone()).await, 403);
    let f = tokenize(&s, &w1, &b1, fields.clone()).await;
    let m = tokenize(&s, &w1, &m_id, fields).await;
    error(&f, 404);
    same_answer(
        "limited writer tokenizes in a foreign study",
        &f,
        &b1,
        &m,
        &m_id,
    );

    let v = ok(&get(&s, &format!("/v1/records/{ra}"), Some(&r1)).await, 200);
    assert_eq!(v["study"], a1.as_str());
    error(
        &get(&s, &format!("/v1/records/{ra2}"), Some(&r1)).await,
        403,
    );
    let f = get(&s, &format!("/v1/records/{rb}"), Some(&r1)).await;
    let m_id = missing_like(&ra);
    let m = get(&s, &format!("/v1/records/{m_id}"), Some(&r1)).await;
    error(&f, 404);
    same_answer("limited reader, foreign record", &f, &rb, &m, &m_id);
    // BLOBs, exports and field tokens of the limited reader.
    blob_served(&get(&s, &format!("/v1/blobs/{ba}"), Some(&r1)).await);
    error(&get(&s, &format!("/v1/blobs/{ba2}"), Some(&r1)).await, 403);
    let f = get(&s, &format!("/v1/blobs/{bb}"), Some(&r1)).await;
    let m_id = missing_like(&ba);
    let m = get(&s, &format!("/v1/blobs/{m_id}"), Some(&r1)).await;
    error(&f, 404);
    same_answer("limited reader, foreign BLOB", &f, &bb, &m, &m_id);
    let export = |study: &str| format!("/v1/studies/{study}/participants/P-1/export");
    ok(&get(&s, &export(&a1), Some(&r1)).await, 200);
    error(&get(&s, &export(&a2), Some(&r1)).await, 403);
    let m_id = missing_like(&a1);
    let f = get(&s, &export(&b1), Some(&r1)).await;
    let m = get(&s, &export(&m_id), Some(&r1)).await;
    error(&f, 404);
    same_answer(
        "limited reader exports from a foreign study",
        &f,
        &b1,
        &m,
        &m_id,
    );
    // Detokenize answers per token: out of the key's studies is `null`.
    assert_eq!(
        detokenize(&s, &r1, &[&ta, &ta2, &tb]).await,
        json!({ ta.clone(): A_VALUE, ta2.clone(): null, tb.clone(): null })
    );

    // An admin limited to A1 deletes nothing of A2.
    for (what, path) in [
        ("a record", format!("/v1/records/{ra2}")),
        ("a BLOB", format!("/v1/blobs/{ba2}")),
        (
            "a participant",
            format!("/v1/studies/{a2}/participants/P-A2"),
        ),
        ("a study", format!("/v1/studies/{a2}")),
    ] {
        let e = error(&delete(&s, &path, Some(&ad1)).await, 403);
        assert!(e["code"].is_string(), "limited admin deletes {what} of A2");
    }
    let f = delete(&s, &format!("/v1/studies/{b1}"), Some(&ad1)).await;
    let m_id = missing_like(&a1);
    let m = delete(&s, &format!("/v1/studies/{m_id}"), Some(&ad1)).await;
    error(&f, 404);
    same_answer("limited admin deletes a foreign study", &f, &b1, &m, &m_id);

    // Nor can it widen itself: no key beyond A1, no new study, and only the
    // keys limited to A1 are listed and revocable.
    for wider in [
        json!({ "role": "reader" }),
        json!({ "role": "admin" }),
        json!({ "role": "reader", "studies": [a2] }),
        json!({ "role": "reader", "studies": [a1, a2] }),
    ] {
        error(&post(&s, "/v1/api-keys", Some(&ad1), &wider).await, 403);
    }
    error(
        &post(&s, "/v1/studies", Some(&ad1), &json!({ "name": "mine" })).await,
        403,
    );
    let (narrow_id, narrow) = key(&s, &ad1, json!({ "role": "reader", "studies": [a1] })).await;
    ok(
        &get(&s, &format!("/v1/records/{ra}"), Some(&narrow)).await,
        200,
    );
    error(
        &get(&s, &format!("/v1/records/{ra2}"), Some(&narrow)).await,
        403,
    );
    let (wide_id, wide) = key(&s, &a.tenant.admin, json!({ "role": "reader" })).await;
    let listed = ok(&get(&s, "/v1/api-keys", Some(&ad1)).await, 200);
    let listed: Vec<&str> = listed["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["id"].as_str())
        .collect();
    assert!(listed.contains(&narrow_id.as_str()), "{listed:?}");
    assert!(
        !listed.contains(&wide_id.as_str()),
        "a wider key listed: {listed:?}"
    );
    error(
        &delete(&s, &format!("/v1/api-keys/{wide_id}"), Some(&ad1)).await,
        404,
    );
    ok(&get(&s, "/v1/studies", Some(&wide)).await, 200);
    ok(
        &delete(&s, &format!("/v1/api-keys/{narrow_id}"), Some(&ad1)).await,
        204,
    );
    error(&get(&s, "/v1/studies", Some(&narrow)).await, 401);

    // Nothing of B's was touched by anything above.
    let v = ok(
        &get(&s, &format!("/v1/records/{rb}"), Some(&b.reader)).await,
        200,
    );
    assert_eq!(v["version"], 1, "B's record never corrected: {v}");
    assert_eq!(v["data"], json!({ "who": "b" }));
    ok(&get(&s, "/v1/studies", Some(&kb)).await, 200);
    blob_served(&get(&s, &format!("/v1/blobs/{bb}"), Some(&b.reader)).await);
    assert_eq!(
        detokenize(&s, &b.reader, &[&tb]).await,
        json!({ tb.clone(): B_VALUE })
    );
    let ids = study_ids(&ok(&get(&s, "/v1/studies", Some(&b.reader)).await, 200));
    assert!(ids.contains(&b1), "B's study not deleted: {ids:?}");
    let v = export_of(&s, &b.reader, &b1, "P-B").await;
    assert_eq!(v["records"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["blobs"][0]["token"], bb.as_str(), "{v}");
    assert_eq!(
        v["fields"],
        json!([{ "token": tb, "value": B_VALUE }]),
        "{v}"
    );
    let v = ok(
        &get(&s, &format!("/v1/jobs/{jb}"), Some(&b.tenant.admin)).await,
        200,
    );
    assert_eq!(v["kind"], "delete_study", "{v}");
    // Nor anything of A2 by the keys limited to A1.
    let v = ok(
        &get(&s, &format!("/v1/records/{ra2}"), Some(&a.reader)).await,
        200,
    );
    assert_eq!(
        v["version"], 1,
        "A2's record not corrected by the limited writer"
    );
    blob_served(&get(&s, &format!("/v1/blobs/{ba2}"), Some(&a.reader)).await);
    assert_eq!(
        detokenize(&s, &a.reader, &[&ta2]).await,
        json!({ ta2.clone(): A_VALUE })
    );

    // And B's principals get the same answers about A's resources.
    let f = get(&s, &format!("/v1/records/{ra}"), Some(&b.reader)).await;
    let m_id = missing_like(&rb);
    let m = get(&s, &format!("/v1/records/{m_id}"), Some(&b.reader)).await;
    error(&f, 404);
    same_answer("B reads A's record", &f, &ra, &m, &m_id);
    let f = get(&s, &format!("/v1/blobs/{ba}"), Some(&b.reader)).await;
    let m_id = missing_like(&bb);
    let m = get(&s, &format!("/v1/blobs/{m_id}"), Some(&b.reader)).await;
    error(&f, 404);
    same_answer("B reads A's BLOB", &f, &ba, &m, &m_id);
    let f = get(&s, &format!("/v1/jobs/{ja}"), Some(&b.tenant.admin)).await;
    let m_id = missing_like(&jb);
    let m = get(&s, &format!("/v1/jobs/{m_id}"), Some(&b.tenant.admin)).await;
    error(&f, 404);
    same_answer("B reads A's job", &f, &ja, &m, &m_id);
    let f = post(
        &s,
        "/v1/detokenize",
        Some(&b.reader),
        &json!({ "tokens": [ta] }),
    )
    .await;
    let m_id = missing_like(&tb);
    let m = post(
        &s,
        "/v1/detokenize",
        Some(&b.reader),
        &json!({ "tokens": [m_id] }),
    )
    .await;
    same_null_answer("B detokenizes A's token", &f, &ta, &m, &m_id);
}

// ---------------------------------------------------------------------------
// 7. Health

/// A field of `/proc/<pid>/<file>`, after its label.
fn proc_field(pid: u32, file: &str, label: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("{label} in /proc/{pid}/{file}"))
        .trim()
        .to_owned()
}

/// Every service that holds keys or plaintext runs with core dumps off
/// (limit 0, soft and hard) and, as root, with its memory locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_cannot_dump_core_and_lock_their_memory() {
    let _slot = slot().await;
    let s = ApiStack::start();
    let worker = s.start_worker();
    // The worker logs its hardening once it is up.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    for service in [&s.api, &s.path.encryptd, &s.path.keyd, &worker] {
        let pid = service.pid();
        let core = proc_field(pid, "limits", "Max core file size");
        let limits: Vec<&str> = core.split_whitespace().take(2).collect();
        assert_eq!(limits, ["0", "0"], "{}: {core}", service.log.display());
        let log = std::fs::read_to_string(&service.log).unwrap();
        assert!(log.contains("core dumps off"), "{log}");
        if root {
            let locked = proc_field(pid, "status", "VmLck:");
            let kib: u64 = locked.trim_end_matches(" kB").trim().parse().unwrap();
            assert!(kib > 0, "{}: VmLck {locked}", service.log.display());
            assert!(log.contains("memory locked"), "{log}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_key_host_when_it_is_down() {
    let _slot = slot().await;
    let mut s = ApiStack::start();
    let r = get(&s, "/healthz", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&s, "/readyz", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let team = team(&s, "Health").await;
    let study_id = study(&s, &team.tenant.admin, "Cardio").await;
    record(&s, &team.writer, &study_id, "P-1", json!({ "ok": true })).await;

    s.path.keyd.kill();

    // Readiness may be cached for a moment: poll.
    let mut last = get(&s, "/readyz", None).await;
    for _ in 0..30 {
        if last.status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = get(&s, "/readyz", None).await;
    }
    assert_eq!(last.status, 503, "the key host is down: {}", last.text());
    let text = last.text().to_lowercase();
    assert!(
        ["key host", "key_host", "keyhost", "key-host", "keyd"]
            .iter()
            .any(|name| text.contains(name)),
        "503 names the key host: {text}"
    );

    // The process is still up, and a write answers 503 (a dependency down),
    // in the error shape.
    let r = get(&s, "/healthz", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(
        &s,
        &format!("/v1/studies/{study_id}/records"),
        Some(&team.writer),
        &json!({ "participant": "P-2", "data": { "ok": false } }),
    )
    .await;
    error(&r, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_export_returns_every_record_of_that_participant_and_nothing_else() {
    let _slot = slot().await;
    let s = ApiStack::start();
    let team = team(&s, "Export").await;
    let other = team_of_other_tenant(&s).await;
    let study_id = study(&s, &team.tenant.admin, "Neuro").await;
    let mine = [
        record(&s, &team.writer, &study_id, "P-7", json!({"visit": 1})).await,
        record(&s, &team.writer, &study_id, "P-7", json!({"visit": 2})).await,
    ];
    let theirs = record(&s, &team.writer, &study_id, "P-8", json!({"visit": 1})).await;
    // A correction is exported as its current version; a deleted record is gone.
    ok(
        &put(
            &s,
            &format!("/v1/records/{}", mine[1]),
            Some(&team.writer),
            &json!({"data": {"visit": 22}}),
        )
        .await,
        200,
    );
    let gone = record(&s, &team.writer, &study_id, "P-7", json!({"visit": 3})).await;
    assert_eq!(
        delete(&s, &format!("/v1/records/{gone}"), Some(&team.tenant.admin))
            .await
            .status,
        204
    );

    let path = format!("/v1/studies/{study_id}/participants/P-7/export");
    let v = ok(&get(&s, &path, Some(&team.reader)).await, 200);
    assert_eq!(v["participant"], "P-7");
    let records = v["records"].as_array().unwrap();
    let tokens: Vec<&str> = records
        .iter()
        .map(|r| r["token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 2, "{v}");
    assert!(mine.iter().all(|t| tokens.contains(&t.as_str())), "{v}");
    assert!(!tokens.contains(&theirs.as_str()) && !tokens.contains(&gone.as_str()));
    let corrected = records.iter().find(|r| r["token"] == mine[1]).unwrap();
    assert_eq!(corrected["data"], json!({"visit": 22}));
    assert_eq!(v["blobs"], json!([]));
    assert_eq!(v["fields"], json!([]));

    // BLOBs and field tokens: P-7's, with values, and none of P-8's.
    let mut blobs = Vec::new();
    for (participant, size) in [("P-7", 1000usize), ("P-8", 2000)] {
        let r = s
            .client
            .put(format!(
                "{}/v1/studies/{study_id}/blobs?participant={participant}",
                s.url()
            ))
            .bearer_auth(&team.writer)
            .header("content-type", "text/plain")
            .body(vec![b'x'; size])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        blobs.push(assert_id(
            &r.json::<Value>().await.unwrap()["token"],
            "blb_",
        ));
    }
    let my_field = field_token(
        &ok(
            &tokenize(
                &s,
                &team.writer,
                &study_id,
                json!({"participant": "P-7", "fields": {"mrn": "M-7"}}),
            )
            .await,
            200,
        ),
        "mrn",
        "tok_",
    );
    ok(
        &tokenize(
            &s,
            &team.writer,
            &study_id,
            json!({"participant": "P-8", "fields": {"mrn": "M-8"}}),
        )
        .await,
        200,
    );
    let v = ok(&get(&s, &path, Some(&team.reader)).await, 200);
    assert_eq!(v["records"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(
        v["blobs"],
        json!([{"token": blobs[0], "size": 1000, "content_type": "text/plain"}])
    );
    assert_eq!(v["fields"], json!([{"token": my_field, "value": "M-7"}]));

    // A participant with nothing stored gets an empty export, not an error.
    let empty = export_of(&s, &team.reader, &study_id, "P-404").await;
    assert_eq!(empty["records"], json!([]));
    // Writers do not read; another tenant sees no such study.
    error(&get(&s, &path, Some(&team.writer)).await, 403);
    error(&get(&s, &path, Some(&other)).await, 404);
}

/// A reader key of a second tenant.
async fn team_of_other_tenant(s: &ApiStack) -> String {
    team(s, "Elsewhere").await.reader
}

/// A call with an `Idempotency-Key`.
async fn with_key(
    s: &ApiStack,
    method: Method,
    path: &str,
    key: &str,
    idempotency_key: &str,
    body: Option<&Value>,
) -> ApiResponse {
    let mut request = s
        .request(method, path, Some(key))
        .header("idempotency-key", idempotency_key);
    if let Some(body) = body {
        request = request.json(body);
    }
    let r = s.send(request).await;
    common(&r);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_twice_stores_one_record_and_runs_every_write_once() {
    let _slot = slot().await;
    let s = ApiStack::start();
    let team = team(&s, "Idempotent").await;
    let study_id = study(&s, &team.tenant.admin, "Once").await;
    let path = format!("/v1/studies/{study_id}/records");
    let body = json!({"participant": "P-1", "kind": "visit", "data": {"bp": "120/80"}});
    let send = |body: Value, key: &'static str| {
        let s = &s;
        let path = path.clone();
        let writer = team.writer.clone();
        async move {
            s.client
                .post(format!("{}{path}", s.url()))
                .bearer_auth(writer)
                .header("idempotency-key", key)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let first = send(body.clone(), "k-1").await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = send(body.clone(), "k-1").await;
    assert_eq!(again.status(), 201);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, first, "the first answer, again");

    let other_body = send(
        json!({"participant": "P-1", "data": {"bp": "140/90"}}),
        "k-1",
    )
    .await;
    assert_eq!(other_body.status(), 409);

    let export = export_of(&s, &team.reader, &study_id, "P-1").await;
    assert_eq!(
        export["records"].as_array().unwrap().len(),
        1,
        "one record stored: {export}"
    );

    // A retried correction makes one new version; another correction under
    // the same key is refused.
    let token = first["token"].as_str().unwrap().to_owned();
    let record_path = format!("/v1/records/{token}");
    let correction = json!({"data": {"bp": "130/85"}});
    let correct = |key: &'static str, body: Value| {
        let (s, path, writer) = (&s, record_path.clone(), team.writer.clone());
        async move { with_key(s, Method::PUT, &path, &writer, key, Some(&body)).await }
    };
    let corrected = ok(&correct("c-1", correction.clone()).await, 200);
    assert_eq!(corrected["version"], 2, "{corrected}");
    assert_eq!(
        ok(&correct("c-1", correction.clone()).await, 200),
        corrected
    );
    let read = ok(&get(&s, &record_path, Some(&team.reader)).await, 200);
    assert_eq!(
        (&read["version"], &read["data"]),
        (&json!(2), &correction["data"])
    );
    let reused = error(&correct("c-1", json!({"data": {"bp": "1/1"}})).await, 409);
    assert_eq!(reused["code"], "idempotency_key_reused");

    // API keys: a replay answers the same key without its secret (shown
    // once, kept nowhere); one key exists. Revocation answers 204 again.
    let admin = team.tenant.admin.as_str();
    let new_key = json!({"role": "reader", "name": "made once"});
    let create_key = || {
        with_key(
            &s,
            Method::POST,
            "/v1/api-keys",
            admin,
            "ak-1",
            Some(&new_key),
        )
    };
    let made = ok(&create_key().await, 201);
    assert!(made["secret"].is_string());
    let replay = ok(&create_key().await, 201);
    assert_eq!(replay["id"], made["id"]);
    assert_eq!(replay["role"], "reader");
    assert!(replay.get("secret").is_none(), "{replay}");
    let listed = ok(&get(&s, "/v1/api-keys", Some(admin)).await, 200);
    let named = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["name"] == "made once")
        .count();
    assert_eq!(named, 1, "{listed}");
    let revoke_path = format!("/v1/api-keys/{}", made["id"].as_str().unwrap());
    for _ in 0..2 {
        let r = with_key(&s, Method::DELETE, &revoke_path, admin, "rv-1", None).await;
        assert_eq!(r.status, 204, "{}", r.text());
    }
    error(&delete(&s, &revoke_path, Some(admin)).await, 404);

    // Record and BLOB deletion: a retry answers 204 again, not 404.
    for _ in 0..2 {
        let r = with_key(&s, Method::DELETE, &record_path, admin, "rd-1", None).await;
        assert_eq!(r.status, 204, "{}", r.text());
    }
    error(&get(&s, &record_path, Some(&team.reader)).await, 404);
    let blob = ok(
        &raw(
            &s,
            Method::PUT,
            &format!("/v1/studies/{study_id}/blobs?participant=P-1"),
            Some(&team.writer),
            "application/octet-stream",
            vec![1u8; 1000],
        )
        .await,
        201,
    );
    let blob_path = format!("/v1/blobs/{}", blob["token"].as_str().unwrap());
    for _ in 0..2 {
        let r = with_key(&s, Method::DELETE, &blob_path, admin, "bd-1", None).await;
        assert_eq!(r.status, 204, "{}", r.text());
    }
    error(&get(&s, &blob_path, Some(&team.reader)).await, 404);

    // The operator: one tenant per key (the replay without its admin key),
    // one deletion job.
    let operator = s.operator_key.as_str();
    let new_tenant = json!({"name": "Made once"});
    let create_tenant = || {
        with_key(
            &s,
            Method::POST,
            "/v1/tenants",
            operator,
            "t-1",
            Some(&new_tenant),
        )
    };
    let made = ok(&create_tenant().await, 201);
    assert!(made["admin_key"].is_string());
    let replay = ok(&create_tenant().await, 201);
    assert_eq!(
        (&replay["id"], &replay["name"]),
        (&made["id"], &made["name"])
    );
    assert!(replay.get("admin_key").is_none(), "{replay}");
    let tenant_path = format!("/v1/tenants/{}", made["id"].as_str().unwrap());
    let job = ok(
        &with_key(&s, Method::DELETE, &tenant_path, operator, "td-1", None).await,
        202,
    );
    assert_id(&job["job"], "job_");
    let again = ok(
        &with_key(&s, Method::DELETE, &tenant_path, operator, "td-1", None).await,
        202,
    );
    assert_eq!(again, job);
}

/// Polls a job until it ends; returns its final view.
async fn finished_job(s: &ApiStack, job: &str, key: &str) -> Value {
    for _ in 0..300 {
        let v = ok(&get(s, &format!("/v1/jobs/{job}"), Some(key)).await, 200);
        if v["state"] == "succeeded" || v["state"] == "failed" {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("job {job} did not finish in 30 s");
}

/// The KEK objects on the stack's SoftHSM token, read straight through PKCS#11.
/// The module in this process sees only the tokens there were when it was
/// first loaded: one test per process may use this (the study shredding).
fn kek_objects_on_token(s: &ApiStack, kek: &str) -> usize {
    use cryptoki::object::Attribute;
    let token = &s.path.infra.token;
    let module =
        coffer_hsm::pkcs11::shared_module(&coffer_softhsm::find_softhsm_module().unwrap()).unwrap();
    let slot = module
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| module.get_token_info(*slot).unwrap().label().trim_end() == token.label())
        .expect("the stack's token is visible to this process");
    let session = module.open_ro_session(slot).unwrap();
    match session.login(cryptoki::session::UserType::User, Some(token.user_pin())) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("login: {e}"),
    }
    session
        .find_objects(&[Attribute::Label(kek.as_bytes().to_vec())])
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_study_shreds_its_kek_in_the_hsm_so_restored_key_rows_are_useless() {
    let _slot = slot().await;
    let s = ApiStack::start();
    let _worker = s.start_worker();
    let team = team(&s, "Shred").await;
    let doomed = study(&s, &team.tenant.admin, "Doomed").await;
    let kept = study(&s, &team.tenant.admin, "Kept").await;
    let tokens = [
        record(&s, &team.writer, &doomed, "P-1", json!({"x": 1})).await,
        record(&s, &team.writer, &doomed, "P-2", json!({"x": 2})).await,
    ];
    let survivor = record(&s, &team.writer, &kept, "P-1", json!({"x": 3})).await;
    let scan = s
        .client
        .put(format!(
            "{}/v1/studies/{doomed}/blobs?participant=P-1",
            s.url()
        ))
        .bearer_auth(&team.writer)
        .body(vec![7u8; 100_000])
        .send()
        .await
        .unwrap();
    assert_eq!(scan.status(), 201);
    let fields = ok(
        &tokenize(
            &s,
            &team.writer,
            &doomed,
            json!({"participant": "P-1", "fields": {"mrn": "M-1"}}),
        )
        .await,
        200,
    );
    let field = field_token(&fields, "mrn", "tok_");

    // What an attacker would keep: the study's KEK id, the record refs from
    // the metadata DB, and a copy of the key DB rows, all taken before.
    let meta_url = s.path.infra.verified_url(&s.meta);
    let mut meta = <sqlx::PgConnection as sqlx::Connection>::connect(&meta_url)
        .await
        .unwrap();
    let (kek,): (String,) = sqlx::query_as("SELECT kek_id FROM studies WHERE id = $1")
        .bind(&doomed)
        .fetch_one(&mut meta)
        .await
        .unwrap();
    let refs: Vec<(String, String)> =
        sqlx::query_as("SELECT key_ref, blob_ref FROM records WHERE study_id = $1")
            .bind(&doomed)
            .fetch_all(&mut meta)
            .await
            .unwrap();
    let key_url = s.path.infra.verified_url(&s.path.infra.key_db);
    let mut key_db = <sqlx::PgConnection as sqlx::Connection>::connect(&key_url)
        .await
        .unwrap();
    type KeyRow = (Vec<u8>, String, i32, Vec<u8>, Vec<u8>, Vec<u8>, i16);
    let backup: Vec<KeyRow> = sqlx::query_as(
        "SELECT key_ref, kek_id, kek_version, wrapped_enc, wrapped_mac, nonce, format FROM data_keys WHERE kek_id = $1",
    )
    .bind(&kek)
    .fetch_all(&mut key_db)
    .await
    .unwrap();
    assert_eq!(backup.len(), 4, "two records, one BLOB, one field set");
    assert!(
        kek_objects_on_token(&s, &kek) >= 1,
        "the KEK is on the token before"
    );

    let r = delete(
        &s,
        &format!("/v1/studies/{doomed}"),
        Some(&team.tenant.admin),
    )
    .await;
    let v = ok(&r, 202);
    let job = assert_id(&v["job"], "job_");
    // Gone for the API at once.
    error(
        &get(
            &s,
            &format!("/v1/records/{}", tokens[0]),
            Some(&team.reader),
        )
        .await,
        404,
    );
    let done = finished_job(&s, &job, &team.tenant.admin).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["kind"], "delete_study");
    assert_eq!(done["receipt"]["kek"], "destroyed", "{done}");
    assert_eq!(done["receipt"]["records_destroyed"], 2, "{done}");
    assert_eq!(done["receipt"]["blobs_destroyed"], 1, "{done}");
    assert_eq!(done["receipt"]["field_sets_destroyed"], 1, "{done}");
    assert_eq!(
        detokenize(&s, &team.reader, &[&field]).await,
        json!({ field.clone(): null }),
        "its field tokens are gone too"
    );

    assert_eq!(
        kek_objects_on_token(&s, &kek),
        0,
        "no object of the KEK is left on the token"
    );

    // Restore the key rows from the copy: they open nothing.
    for row in &backup {
        sqlx::query(
            "INSERT INTO data_keys (key_ref, kek_id, kek_version, wrapped_enc, wrapped_mac, nonce, format) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(&row.0)
        .bind(&row.1)
        .bind(row.2)
        .bind(&row.3)
        .bind(&row.4)
        .bind(&row.5)
        .bind(row.6)
        .execute(&mut key_db)
        .await
        .unwrap();
    }
    let cert = s
        .path
        .infra
        .client_cert(coffer_keyhost::api::roles::ENCRYPTION_HOST);
    let keys = coffer_keyhost::client::KeyHostClient::new(
        &s.path.keyd.url(),
        &s.path.infra.ca.cert_path(),
        &cert.cert,
        &cert.key,
    )
    .unwrap();
    for (key_ref, blob_ref) in &refs {
        let id = coffer_keyhost::api::KeyRefId::parse(key_ref).unwrap();
        let err = keys
            .open(id)
            .await
            .expect_err("a restored row of a shredded KEK must not open");
        assert_eq!(err.code(), "unknown_kek", "{err}");
        // And the ciphertext is gone from every blob node too.
        let api = s.path.api_client();
        let r = api
            .get(format!(
                "{}/v1/objects/{blob_ref}?key_ref={key_ref}&whole=true",
                s.path.encryptd.url()
            ))
            .header("x-coffer-context", "00".repeat(32))
            .send()
            .await
            .unwrap();
        assert!(!r.status().is_success());
    }
    // The other study is untouched.
    let v = ok(
        &get(&s, &format!("/v1/records/{survivor}"), Some(&team.reader)).await,
        200,
    );
    assert_eq!(v["data"], json!({"x": 3}));
}

/// Runs `coffer <args>` against the stack; returns (success, stdout, stderr).
fn coffer_cli(
    s: &ApiStack,
    key: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = std::process::Command::new(coffer_tests::bin("coffer"));
    cmd.args(args)
        .arg("--url")
        .arg(s.url())
        .arg("--cacert")
        .arg(s.path.infra.ca.cert_path())
        .env("COFFER_KEY", key)
        .arg("--env-file")
        .arg("/nonexistent/dev.env")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_puts_gets_exports_and_deletes_records() {
    let _slot = slot().await;
    let s = ApiStack::start();
    let _worker = s.start_worker();
    let team = team(&s, "Cli").await;
    let study_id = study(&s, &team.tenant.admin, "Cli study").await;

    let (ok_put, out, err) = coffer_cli(
        &s,
        &team.writer,
        &[
            "put",
            "--study",
            &study_id,
            "--participant",
            "P-9",
            "--kind",
            "visit",
        ],
        Some(r#"{"bp": "118/76"}"#),
    );
    assert!(ok_put, "{err}");
    let stored: Value = serde_json::from_str(&out).unwrap();
    let token = assert_token(&stored["token"]);

    let (ok_get, out, err) = coffer_cli(&s, &team.reader, &["get", &token], None);
    assert!(ok_get, "{err}");
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["data"], json!({"bp": "118/76"}));

    let (ok_export, out, _) = coffer_cli(
        &s,
        &team.reader,
        &["export", "--study", &study_id, "--participant", "P-9"],
        None,
    );
    assert!(ok_export);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["records"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Errors say what happened and exit non-zero.
    let (ok_missing, _, err) = coffer_cli(
        &s,
        &team.reader,
        &["get", "rec_aaaaaaaaaaaaaaaaaaaaaaaaaa"],
        None,
    );
    assert!(!ok_missing);
    assert!(err.contains("404 not_found"), "{err}");
    let (ok_bad, _, err) = coffer_cli(
        &s,
        &team.writer,
        &["put", "--study", &study_id, "--participant", "P-9"],
        Some("not json"),
    );
    assert!(!ok_bad && err.contains("not valid JSON"), "{err}");

    // BLOBs, streamed from a file to a file.
    let dir = tempfile::tempdir().unwrap();
    let scan: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.path().join("scan.bin"), &scan).unwrap();
    let (ok_up, out, err) = coffer_cli(
        &s,
        &team.writer,
        &[
            "put-blob",
            "--study",
            &study_id,
            "--participant",
            "P-9",
            "--content-type",
            "application/dicom",
            dir.path().join("scan.bin").to_str().unwrap(),
        ],
        None,
    );
    assert!(ok_up, "{err}");
    let blob: Value = serde_json::from_str(&out).unwrap();
    let blob_token = assert_id(&blob["token"], "blb_");
    let copy = dir.path().join("copy.bin");
    let (ok_down, _, err) = coffer_cli(
        &s,
        &team.reader,
        &["get-blob", &blob_token, "-o", copy.to_str().unwrap()],
        None,
    );
    assert!(ok_down, "{err}");
    assert_eq!(std::fs::read(&copy).unwrap(), scan);
    // Health data on disk is the user's alone, and only whole files appear.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A BLOB token is deleted as a BLOB; a download that fails leaves nothing.
    let (ok_blob_delete, _, err) =
        coffer_cli(&s, &team.tenant.admin, &["delete", &blob_token], None);
    assert!(ok_blob_delete, "{err}");
    let gone = dir.path().join("gone.bin");
    let (ok_gone_blob, _, err) = coffer_cli(
        &s,
        &team.reader,
        &["get-blob", &blob_token, "-o", gone.to_str().unwrap()],
        None,
    );
    assert!(!ok_gone_blob && err.contains("404"), "{err}");
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["copy.bin", "scan.bin"]);

    // One --idempotency-key, two invocations: one record.
    let put_once = |key: &str| {
        let (ok, out, err) = coffer_cli(
            &s,
            &team.writer,
            &[
                "put",
                "--study",
                &study_id,
                "--participant",
                "P-10",
                "--idempotency-key",
                key,
            ],
            Some(r#"{"x": 1}"#),
        );
        assert!(ok, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()["token"].clone()
    };
    assert_eq!(put_once("cli-retry-1"), put_once("cli-retry-1"));

    // A settings file others can read is refused, not trusted.
    let shared_env = dir.path().join("dev.env");
    std::fs::write(&shared_env, format!("COFFER_URL='{}'\n", s.url())).unwrap();
    std::fs::set_permissions(&shared_env, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = std::process::Command::new(coffer_tests::bin("coffer"))
        .args(["get", &token, "--env-file"])
        .arg(&shared_env)
        .env("COFFER_KEY", &team.reader)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("chmod 600"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // The same file made private is used; the key comes from --api-key-file.
    std::fs::write(
        &shared_env,
        format!(
            "COFFER_URL='{}'\nCOFFER_CACERT='{}'\n",
            s.url(),
            s.path.infra.ca.cert_path().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&shared_env, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key_file = dir.path().join("reader.key");
    std::fs::write(&key_file, format!("{}\n", team.reader)).unwrap();
    let read = std::process::Command::new(coffer_tests::bin("coffer"))
        .args(["get", &token, "--env-file"])
        .arg(&shared_env)
        .arg("--api-key-file")
        .arg(&key_file)
        .env_remove("COFFER_KEY")
        .output()
        .unwrap();
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&read.stdout).unwrap()["data"],
        json!({"bp": "118/76"})
    );

    let (ok_delete, _, err) = coffer_cli(&s, &team.tenant.admin, &["delete", &token], None);
    assert!(ok_delete, "{err}");
    let (ok_gone, _, _) = coffer_cli(&s, &team.reader, &["get", &token], None);
    assert!(!ok_gone);

    // Field tokens: values from stdin, never the command line.
    let (ok_tok, out, err) = coffer_cli(
        &s,
        &team.writer,
        &["tokenize", "--study", &study_id, "--participant", "P-9"],
        Some(r#"{"name": "Jane Roe", "mrn": "MRN-77"}"#),
    );
    assert!(ok_tok, "{err}");
    let tokens: Value = serde_json::from_str(&out).unwrap();
    let name = field_token(&tokens, "name", "tok_");
    let mrn = field_token(&tokens, "mrn", "tok_");
    let (ok_detok, out, err) = coffer_cli(&s, &team.reader, &["detokenize", &name, &mrn], None);
    assert!(ok_detok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["values"],
        json!({ name.clone(): "Jane Roe", mrn.clone(): "MRN-77" })
    );
    // --deterministic needs a can_link key: the refusal says so.
    let (ok_link, _, err) = coffer_cli(
        &s,
        &team.writer,
        &["tokenize", "--study", &study_id, "--deterministic", "mrn"],
        Some(r#"{"mrn": "MRN-77"}"#),
    );
    assert!(
        !ok_link && err.contains("403") && err.contains("can_link"),
        "{err}"
    );
    assert!(!err.contains("MRN-77"), "no value in the error: {err}");

    // Forgetting a participant is a job; `coffer job` follows it.
    let (ok_forget, out, err) = coffer_cli(
        &s,
        &team.tenant.admin,
        &["forget", "--study", &study_id, "--participant", "P-9"],
        None,
    );
    assert!(ok_forget, "{err}");
    let job = assert_id(&serde_json::from_str::<Value>(&out).unwrap()["job"], "job_");
    let mut state = Value::Null;
    for _ in 0..300 {
        let (ok_job, out, err) = coffer_cli(&s, &team.tenant.admin, &["job", &job], None);
        assert!(ok_job, "{err}");
        state = serde_json::from_str(&out).unwrap();
        if state["state"] == "succeeded" || state["state"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state["state"], "succeeded", "{state}");
    assert_eq!(state["receipt"]["kek_rotation"], "done", "{state}");
    let (_, out, _) = coffer_cli(&s, &team.reader, &["detokenize", &name], None);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["values"][&name],
        Value::Null
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_stream_in_and_out_with_ranges() {
    let _slot = slot().await;
    let s = ApiStack::start();
    let team = team(&s, "Blobs").await;
    let other = team_of_other_tenant(&s).await;
    let study_id = study(&s, &team.tenant.admin, "Imaging").await;
    let bytes: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();

    let r = s
        .client
        .put(format!(
            "{}/v1/studies/{study_id}/blobs?participant=P-5",
            s.url()
        ))
        .bearer_auth(&team.writer)
        .header("content-type", "image/png")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers().contains_key("strict-transport-security"));
    let v: Value = r.json().await.unwrap();
    let token = assert_id(&v["token"], "blb_");
    assert_eq!(v["size"], bytes.len() as u64);
    assert_eq!(v["content_type"], "image/png");
    use sha2::Digest;
    assert_eq!(
        v["sha256"],
        data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(&bytes))
    );

    let fetch = |range: Option<&'static str>, key: String| {
        let s = &s;
        let token = token.clone();
        async move {
            let mut request = s
                .client
                .get(format!("{}/v1/blobs/{token}", s.url()))
                .bearer_auth(key);
            if let Some(range) = range {
                request = request.header("range", range);
            }
            request.send().await.unwrap()
        }
    };
    let r = fetch(None, team.reader.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.bytes().await.unwrap().as_ref(), bytes.as_slice());

    // A range across a segment boundary (64 KiB) and a suffix range.
    let r = fetch(Some("bytes=65500-65599"), team.reader.clone()).await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 65500-65599/{}", bytes.len()).as_str()
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes[65500..65600]);
    let r = fetch(Some("bytes=-10"), team.reader.clone()).await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        &bytes[bytes.len() - 10..]
    );
    // Ranges start at their segment (no decryption from the beginning):
    // one in the second data chunk (segments 15..30), one from the first byte
    // of a segment to the end, one of a single byte.
    for (range, from, to) in [
        ("bytes=1500000-1700000", 1_500_000, 1_700_001),
        ("bytes=2949120-", 2_949_120, bytes.len()),
        ("bytes=983040-983040", 983_040, 983_041),
    ] {
        let r = fetch(Some(range), team.reader.clone()).await;
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            r.bytes().await.unwrap().as_ref(),
            &bytes[from..to],
            "{range}"
        );
    }
    let r = fetch(Some("bytes=99999999-"), team.reader.clone()).await;
    assert_eq!(r.status(), 416);

    // Idempotency-Key: the same bytes twice store one BLOB (the replay is
    // hashed, not stored); other bytes under the key are 409.
    let upload = |body: Vec<u8>| {
        let (s, writer, study_id) = (&s, team.writer.clone(), study_id.clone());
        async move {
            s.client
                .put(format!(
                    "{}/v1/studies/{study_id}/blobs?participant=P-6",
                    s.url()
                ))
                .bearer_auth(writer)
                .header("content-type", "text/plain")
                .header("idempotency-key", "scan-6")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let first = upload(vec![6u8; 300_000]).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = upload(vec![6u8; 300_000]).await;
    assert_eq!(again.status(), 201);
    assert_eq!(
        again.json::<Value>().await.unwrap(),
        first,
        "the first answer again"
    );
    assert_eq!(upload(vec![7u8; 300_000]).await.status(), 409);
    let export = export_of(&s, &team.reader, &study_id, "P-6").await;
    assert_eq!(export["blobs"].as_array().unwrap().len(), 1, "{export}");
    // An upload that breaks off mid-way stores nothing and frees its key:
    // the retry with the same key is stored, not refused as in progress.
    let broken = futures::stream::iter(vec![
        Ok::<_, std::io::Error>(bytes::Bytes::from(vec![8u8; 1 << 20])),
        Err(std::io::Error::other("the client's disk went away")),
    ]);
    let upload_8 = |body: reqwest::Body| {
        s.client
            .put(format!(
                "{}/v1/studies/{study_id}/blobs?participant=P-8",
                s.url()
            ))
            .bearer_auth(&team.writer)
            .header("idempotency-key", "scan-8")
            .body(body)
            .send()
    };
    assert!(
        upload_8(reqwest::Body::wrap_stream(broken))
            .await
            .map_or(true, |r| !r.status().is_success()),
        "a broken-off upload is not stored"
    );
    let mut retried = None;
    for _ in 0..50 {
        let r = upload_8(vec![8u8; 2 << 20].into()).await.unwrap();
        if r.status() != 409 {
            retried = Some(r);
            break;
        }
        // The key is freed just after the broken request ends.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retried = retried.expect("the key was freed");
    assert_eq!(retried.status(), 201);
    let export = export_of(&s, &team.reader, &study_id, "P-8").await;
    assert_eq!(export["blobs"].as_array().unwrap().len(), 1, "{export}");
    assert_eq!(export["blobs"][0]["size"], 2 << 20, "{export}");

    // Roles and tenants.
    assert_eq!(fetch(None, team.writer.clone()).await.status(), 403);
    assert_eq!(fetch(None, other).await.status(), 404);

    // The export lists it; a delete removes it.
    let export = export_of(&s, &team.reader, &study_id, "P-5").await;
    assert_eq!(
        export["blobs"],
        json!([{"token": token, "size": bytes.len(), "content_type": "image/png"}])
    );
    assert_eq!(
        delete(&s, &format!("/v1/blobs/{token}"), Some(&team.tenant.admin))
            .await
            .status,
        204
    );
    assert_eq!(fetch(None, team.reader.clone()).await.status(), 404);
}

// ---------------------------------------------------------------------------
// Field tokenization

async fn tokenize(s: &ApiStack, writer: &str, study: &str, body: Value) -> ApiResponse {
    post(
        s,
        &format!("/v1/studies/{study}/tokenize"),
        Some(writer),
        &body,
    )
    .await
}

async fn detokenize(s: &ApiStack, reader: &str, tokens: &[&str]) -> Value {
    let v = ok(
        &post(
            s,
            "/v1/detokenize",
            Some(reader),
            &json!({ "tokens": tokens }),
        )
        .await,
        200,
    );
    v["values"].clone()
}

fn field_token(v: &Value, name: &str, prefix: &str) -> String {
    let token = v["fields"][name]
        .as_str()
        .unwrap_or_else(|| panic!("fields.{name}: {v}"))
        .to_owned();
    let body = token
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{token} should start with {prefix}"));
    assert_eq!(body.len(), 26, "128 bits in base32: {token}");
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_tokens_random_and_deterministic_round_trip_and_stay_in_their_tenant() {
    let _slot = slot().await;
    let s = ApiStack::start();
    let team = team(&s, "Fields").await;
    let other = team_of_other_tenant(&s).await;
    let admin = &team.tenant.admin;
    let study_a = study(&s, admin, "Cohort A").await;
    let study_b = study(&s, admin, "Cohort B").await;
    let linker = key(&s, admin, json!({"role": "writer", "can_link": true}))
        .await
        .1;
    let scoped_reader = key(
        &s,
        admin,
        json!({"role": "reader", "studies": [study_b.clone()]}),
    )
    .await
    .1;

    // Random tokens: any writer, a new token every time.
    let body = json!({"participant": "P-1", "fields": {"name": "Jane Roe", "ssn": "123-45-6789"}});
    let first = ok(
        &tokenize(&s, &team.writer, &study_a, body.clone()).await,
        200,
    );
    let name = field_token(&first, "name", "tok_");
    let ssn_random = field_token(&first, "ssn", "tok_");
    let again = ok(&tokenize(&s, &team.writer, &study_a, body).await, 200);
    assert_ne!(field_token(&again, "name", "tok_"), name);

    // Deterministic tokens need can_link.
    let linked = json!({"participant": "P-1", "fields": {"name": "Jane Roe", "ssn": "123-45-6789"},
                        "deterministic": ["ssn"]});
    let e = error(
        &tokenize(&s, &team.writer, &study_a, linked.clone()).await,
        403,
    );
    assert!(e["message"].as_str().unwrap().contains("can_link"), "{e}");
    let v = ok(&tokenize(&s, &linker, &study_a, linked.clone()).await, 200);
    let ssn = field_token(&v, "ssn", "dtk_");
    field_token(&v, "name", "tok_");
    // Same value, same study: the same dtk_ (another participant, too).
    let v = ok(
        &tokenize(
            &s,
            &linker,
            &study_a,
            json!({"participant": "P-2", "fields": {"id": "123-45-6789", "other": "123-45-6780"},
                   "deterministic": ["id", "other"]}),
        )
        .await,
        200,
    );
    assert_eq!(field_token(&v, "id", "dtk_"), ssn);
    let other_value = field_token(&v, "other", "dtk_");
    assert_ne!(other_value, ssn);
    // Another study: another dtk_.
    let in_b = ok(&tokenize(&s, &linker, &study_b, linked).await, 200);
    let ssn_b = field_token(&in_b, "ssn", "dtk_");
    assert_ne!(ssn_b, ssn);

    // Detokenize: values back; unknown, malformed and foreign are null.
    let values = detokenize(
        &s,
        &team.reader,
        &[
            &name,
            &ssn_random,
            &ssn,
            &ssn_b,
            &other_value,
            "tok_aaaaaaaaaaaaaaaaaaaaaaaaaa",
            "junk",
        ],
    )
    .await;
    assert_eq!(values[&name], "Jane Roe");
    assert_eq!(values[&ssn_random], "123-45-6789");
    assert_eq!(values[&ssn], "123-45-6789");
    assert_eq!(values[&ssn_b], "123-45-6789");
    assert_eq!(values[&other_value], "123-45-6780");
    assert_eq!(values["tok_aaaaaaaaaaaaaaaaaaaaaaaaaa"], Value::Null);
    assert_eq!(values["junk"], Value::Null);
    let foreign = detokenize(&s, &other, &[&name, &ssn]).await;
    assert_eq!(foreign, json!({ name.clone(): null, ssn.clone(): null }));
    // A reader limited to study B sees only B's tokens.
    let scoped = detokenize(&s, &scoped_reader, &[&name, &ssn_b]).await;
    assert_eq!(
        scoped,
        json!({ name.clone(): null, ssn_b.clone(): "123-45-6789" })
    );
    // Writers tokenize, readers detokenize.
    error(
        &post(
            &s,
            "/v1/detokenize",
            Some(&team.writer),
            &json!({"tokens": [name]}),
        )
        .await,
        403,
    );
    error(
        &tokenize(&s, &team.reader, &study_a, json!({"fields": {"a": "b"}})).await,
        403,
    );

    // Export: the participant's field tokens with values, nobody else's.
    let export = export_of(&s, &team.reader, &study_a, "P-1").await;
    let fields = export["fields"].as_array().unwrap();
    let exported: Vec<&str> = fields
        .iter()
        .map(|f| f["token"].as_str().unwrap())
        .collect();
    for token in [&name, &ssn_random, &ssn] {
        assert!(exported.contains(&token.as_str()), "{token} in {export}");
    }
    assert!(
        !exported.contains(&other_value.as_str()),
        "P-2's token: {export}"
    );
    assert!(
        fields
            .iter()
            .all(|f| f["value"] == "Jane Roe" || f["value"] == "123-45-6789"),
        "{export}"
    );

    // Bad input: clear errors, values never echoed, nothing stored.
    let secret_value = "VALUE-NEVER-ECHOED-4711";
    let sets_before = field_set_rows(&s).await;
    for (body, status) in [
        (json!({"fields": {"n": 4711}}), 400),
        (json!({"fields": {}}), 400),
        (
            json!({"fields": (0..1001).map(|i| (format!("f{i}"), json!(secret_value))).collect::<serde_json::Map<_, _>>()}),
            413,
        ),
        (
            json!({"fields": {"a": secret_value}, "deterministic": ["b"]}),
            400,
        ),
        (
            json!({"fields": {"a": secret_value}, "extra": secret_value}),
            400,
        ),
        (json!({"fields": {"a": "x".repeat(70_000)}}), 413),
    ] {
        let r = tokenize(&s, &linker, &study_a, body).await;
        let e = error(&r, status);
        assert!(!r.text().contains(secret_value), "{e}");
    }
    let too_many: Vec<String> = (0..1001).map(|i| format!("tok_{i}")).collect();
    error(
        &post(
            &s,
            "/v1/detokenize",
            Some(&team.reader),
            &json!({"tokens": too_many}),
        )
        .await,
        413,
    );
    assert_eq!(field_set_rows(&s).await, sets_before, "nothing stored");

    // The metadata DB holds tokens, never values.
    let meta_url = s.path.infra.verified_url(&s.meta);
    let mut meta = <sqlx::PgConnection as sqlx::Connection>::connect(&meta_url)
        .await
        .unwrap();
    let (dump,): (String,) = sqlx::query_as(
        "SELECT coalesce((SELECT string_agg(t::text, '|') FROM field_sets t), '') || \
                coalesce((SELECT string_agg(t::text, '|') FROM field_tokens t), '') || \
                coalesce((SELECT string_agg(t::text, '|') FROM idempotency t), '')",
    )
    .fetch_one(&mut meta)
    .await
    .unwrap();
    assert!(dump.contains(&ssn), "the token is there");
    assert!(!dump.contains("123-45-6789") && !dump.contains("Jane Roe"));

    // Idempotency-Key: the same call twice makes one set.
    let before = field_set_rows(&s).await;
    let mut answers = Vec::new();
    for _ in 0..2 {
        let r = s
            .client
            .post(format!("{}/v1/studies/{study_a}/tokenize", s.url()))
            .bearer_auth(&team.writer)
            .header("idempotency-key", "tok-1")
            .json(&json!({"fields": {"mrn": "MRN-1"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        answers.push(r.json::<Value>().await.unwrap());
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(field_set_rows(&s).await, before + 1);
}

async fn field_set_rows(s: &ApiStack) -> i64 {
    let meta_url = s.path.infra.verified_url(&s.meta);
    let mut meta = <sqlx::PgConnection as sqlx::Connection>::connect(&meta_url)
        .await
        .unwrap();
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM field_sets")
        .fetch_one(&mut meta)
        .await
        .unwrap();
    n
}

// ---------------------------------------------------------------------------
// Participant deletion

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_participant_destroys_everything_of_theirs_and_rotates_the_study_kek() {
    let _slot = slot().await;
    let s = ApiStack::start();
    let _worker = s.start_worker();
    let team = team(&s, "Forget").await;
    let admin = &team.tenant.admin;
    let study_id = study(&s, admin, "Cohort").await;
    let doomed = [
        record(&s, &team.writer, &study_id, "P-1", json!({"x": 1})).await,
        record(&s, &team.writer, &study_id, "P-1", json!({"x": 2})).await,
    ];
    let kept = record(&s, &team.writer, &study_id, "P-2", json!({"x": 3})).await;
    let blob = s
        .client
        .put(format!(
            "{}/v1/studies/{study_id}/blobs?participant=P-1",
            s.url()
        ))
        .bearer_auth(&team.writer)
        .body(vec![9u8; 70_000])
        .send()
        .await
        .unwrap();
    assert_eq!(blob.status(), 201);
    let blob: Value = blob.json().await.unwrap();
    let blob = blob["token"].as_str().unwrap().to_owned();
    let fields = ok(
        &tokenize(
            &s,
            &team.writer,
            &study_id,
            json!({"participant": "P-1", "fields": {"name": "Jane"}}),
        )
        .await,
        200,
    );
    let field = field_token(&fields, "name", "tok_");
    let kept_fields = ok(
        &tokenize(
            &s,
            &team.writer,
            &study_id,
            json!({"participant": "P-2", "fields": {"name": "John"}}),
        )
        .await,
        200,
    );
    let kept_field = field_token(&kept_fields, "name", "tok_");

    // The attacker's copy: P-1's key rows, taken before the deletion.
    let meta_url = s.path.infra.verified_url(&s.meta);
    let mut meta = <sqlx::PgConnection as sqlx::Connection>::connect(&meta_url)
        .await
        .unwrap();
    let refs: Vec<(String,)> = sqlx::query_as("SELECT key_ref FROM records WHERE token = ANY($1)")
        .bind(&doomed[..])
        .fetch_all(&mut meta)
        .await
        .unwrap();
    let key_url = s.path.infra.verified_url(&s.path.infra.key_db);
    let mut key_db = <sqlx::PgConnection as sqlx::Connection>::connect(&key_url)
        .await
        .unwrap();
    type KeyRow = (Vec<u8>, String, i32, Vec<u8>, Vec<u8>, Vec<u8>, i16);
    let mut backup: Vec<KeyRow> = Vec::new();
    for (key_ref,) in &refs {
        let bytes = data_encoding::HEXLOWER.decode(key_ref.as_bytes()).unwrap();
        backup.push(
            sqlx::query_as(
                "SELECT key_ref, kek_id, kek_version, wrapped_enc, wrapped_mac, nonce, format FROM data_keys WHERE key_ref = $1",
            )
            .bind(bytes)
            .fetch_one(&mut key_db)
            .await
            .unwrap(),
        );
    }
    assert_eq!(backup.len(), 2);

    let path = format!("/v1/studies/{study_id}/participants/P-1");
    error(&delete(&s, &path, Some(&team.writer)).await, 403);
    // Sent twice with one Idempotency-Key (a client retry): one job.
    let mut jobs = Vec::new();
    for _ in 0..2 {
        let r = s
            .client
            .delete(format!("{}{path}", s.url()))
            .bearer_auth(admin)
            .header("idempotency-key", "forget-P-1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        jobs.push(assert_id(&r.json::<Value>().await.unwrap()["job"], "job_"));
    }
    assert_eq!(jobs[0], jobs[1], "one job for a retried deletion");
    let job = jobs.remove(0);
    // Hidden at once.
    error(
        &get(
            &s,
            &format!("/v1/records/{}", doomed[0]),
            Some(&team.reader),
        )
        .await,
        404,
    );
    error(
        &get(&s, &format!("/v1/blobs/{blob}"), Some(&team.reader)).await,
        404,
    );

    let done = finished_job(&s, &job, admin).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["kind"], "delete_participant");
    assert!(
        done.get("target").is_none(),
        "no participant hash shown: {done}"
    );
    // Keys limited to another study do not see this study's jobs.
    let elsewhere = study(&s, admin, "Elsewhere").await;
    let limited = key(&s, admin, json!({"role": "reader", "studies": [elsewhere]}))
        .await
        .1;
    error(
        &get(&s, &format!("/v1/jobs/{job}"), Some(&limited)).await,
        403,
    );
    let receipt = &done["receipt"];
    assert_eq!(receipt["records_destroyed"], 2, "{done}");
    assert_eq!(receipt["blobs_destroyed"], 1, "{done}");
    assert_eq!(receipt["field_sets_destroyed"], 1, "{done}");
    assert_eq!(receipt["kek_rotation"], "done", "{done}");
    assert_eq!(receipt["kek_version"], 2, "{done}");
    assert_eq!(receipt["kek_versions_destroyed"], json!([1]), "{done}");

    // Nothing of P-1 is left; P-2 is intact (its keys moved to version 2).
    let export = ok(
        &get(&s, &format!("{path}/export"), Some(&team.reader)).await,
        200,
    );
    assert_eq!(
        (
            export["records"].clone(),
            export["blobs"].clone(),
            export["fields"].clone()
        ),
        (json!([]), json!([]), json!([])),
        "{export}"
    );
    let values = detokenize(&s, &team.reader, &[&field, &kept_field]).await;
    assert_eq!(
        values,
        json!({ field.clone(): null, kept_field.clone(): "John" })
    );
    let v = ok(
        &get(&s, &format!("/v1/records/{kept}"), Some(&team.reader)).await,
        200,
    );
    assert_eq!(v["data"], json!({"x": 3}));
    // New writes go on under the new version.
    record(&s, &team.writer, &study_id, "P-3", json!({"x": 4})).await;

    // Restoring the copied key rows opens nothing: their KEK version is gone.
    for row in &backup {
        assert_eq!(row.2, 1, "the copy was wrapped under version 1");
        sqlx::query(
            "INSERT INTO data_keys (key_ref, kek_id, kek_version, wrapped_enc, wrapped_mac, nonce, format) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(&row.0)
        .bind(&row.1)
        .bind(row.2)
        .bind(&row.3)
        .bind(&row.4)
        .bind(&row.5)
        .bind(row.6)
        .execute(&mut key_db)
        .await
        .unwrap();
    }
    let cert = s
        .path
        .infra
        .client_cert(coffer_keyhost::api::roles::ENCRYPTION_HOST);
    let keys = coffer_keyhost::client::KeyHostClient::new(
        &s.path.keyd.url(),
        &s.path.infra.ca.cert_path(),
        &cert.cert,
        &cert.key,
    )
    .unwrap();
    for (key_ref,) in &refs {
        let err = keys
            .open(coffer_keyhost::api::KeyRefId::parse(key_ref).unwrap())
            .await
            .expect_err("a restored row under a destroyed KEK version must not open");
        assert_eq!(err.code(), "unknown_kek_version", "{err}");
    }
}

// ---------------------------------------------------------------------------
// Purpose of use, linkage limits, metrics, tenant deletion

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasons_link_limits_metrics_and_tenant_deletion() {
    let _slot = slot().await;
    let s = ApiStack::start_with(&["--link-rate", "1", "--link-burst", "3"]);
    let _worker = s.start_worker();
    let team = team(&s, "Purpose").await;
    let admin = &team.tenant.admin;

    // A study that requires a purpose of use on every read.
    let v = ok(
        &post(
            &s,
            "/v1/studies",
            Some(admin),
            &json!({"name": "Strict", "require_reason": true}),
        )
        .await,
        201,
    );
    let strict = assert_id(&v["id"], "std_");
    let lax = study(&s, admin, "Lax").await;
    let strict_record = record(&s, &team.writer, &strict, "P-1", json!({"a": 1})).await;
    let lax_record = record(&s, &team.writer, &lax, "P-1", json!({"a": 2})).await;
    let fields = ok(
        &tokenize(
            &s,
            &team.writer,
            &strict,
            json!({"participant": "P-1", "fields": {"n": "v"}}),
        )
        .await,
        200,
    );
    let field = field_token(&fields, "n", "tok_");
    let blob = s
        .client
        .put(format!(
            "{}/v1/studies/{strict}/blobs?participant=P-1",
            s.url()
        ))
        .bearer_auth(&team.writer)
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(blob.status(), 201);
    let blob = blob.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    for path in [
        format!("/v1/records/{strict_record}"),
        format!("/v1/blobs/{blob}"),
        format!("/v1/studies/{strict}/participants/P-1/export"),
    ] {
        let e = error(&get(&s, &path, Some(&team.reader)).await, 400);
        assert_eq!(e["code"], "reason_required", "{path}: {e}");
        let r = get(&s, &format!("{path}?reason=research"), Some(&team.reader)).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let e = error(
            &get(
                &s,
                &format!("{path}?reason=Not%20A%20Reason"),
                Some(&team.reader),
            )
            .await,
            400,
        );
        assert_eq!(e["code"], "invalid_reason", "{path}: {e}");
    }
    let e = error(
        &post(
            &s,
            "/v1/detokenize",
            Some(&team.reader),
            &json!({"tokens": [field]}),
        )
        .await,
        400,
    );
    assert_eq!(e["code"], "reason_required");
    let v = ok(
        &post(
            &s,
            "/v1/detokenize?reason=treatment",
            Some(&team.reader),
            &json!({"tokens": [field]}),
        )
        .await,
        200,
    );
    assert_eq!(v["values"][&field], "v");
    // A study without the requirement reads with or without one.
    ok(
        &get(&s, &format!("/v1/records/{lax_record}"), Some(&team.reader)).await,
        200,
    );
    ok(
        &get(
            &s,
            &format!("/v1/records/{lax_record}?reason=audit"),
            Some(&team.reader),
        )
        .await,
        200,
    );

    // Linkage is rate-limited per key: a burst of 3, then 1 per second.
    let linker = key(&s, admin, json!({"role": "writer", "can_link": true}))
        .await
        .1;
    let other_linker = key(&s, admin, json!({"role": "writer", "can_link": true}))
        .await
        .1;
    let three = json!({"fields": {"a": "1", "b": "2", "c": "3"}, "deterministic": ["a", "b", "c"]});
    ok(&tokenize(&s, &linker, &lax, three.clone()).await, 200);
    // Three more at once: refused unless three seconds passed meanwhile.
    let e = error(&tokenize(&s, &linker, &lax, three).await, 429);
    let one = json!({"fields": {"a": "1"}, "deterministic": ["a"]});
    assert_eq!(e["code"], "rate_limited");
    ok(&tokenize(&s, &other_linker, &lax, one.clone()).await, 200);
    // Random tokens are not limited.
    ok(
        &tokenize(&s, &linker, &lax, json!({"fields": {"a": "1"}})).await,
        200,
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ok(&tokenize(&s, &linker, &lax, one).await, 200);

    // Metrics: Prometheus text, counting what was served.
    let r = get(&s, "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/plain"),
        "{:?}",
        r.header("content-type")
    );
    let text = r.text();
    let count = |class: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(&format!("coffer_http_responses_total{{class=\"{class}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {class} line in {text}"))
    };
    assert!(count("2xx") >= 10, "{text}");
    assert!(count("4xx") >= 8, "{text}");

    // Deleting the tenant: a job shreds every study, then its keys are refused.
    let job = assert_id(
        &ok(
            &delete(
                &s,
                &format!("/v1/tenants/{}", team.tenant.id),
                Some(&s.operator_key),
            )
            .await,
            202,
        )["job"],
        "job_",
    );
    let done = finished_job(&s, &job, &s.operator_key).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        done["receipt"]["studies"].as_array().unwrap().len(),
        2,
        "{done}"
    );
    assert!(
        done["receipt"]["studies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|study| study["kek"] == "destroyed"),
        "{done}"
    );
    for key in [admin, &team.writer, &team.reader] {
        error(&get(&s, "/v1/studies", Some(key)).await, 401);
    }
}

/// A participant's export (200).
async fn export_of(s: &ApiStack, reader: &str, study: &str, participant: &str) -> Value {
    ok(
        &get(
            s,
            &format!("/v1/studies/{study}/participants/{participant}/export"),
            Some(reader),
        )
        .await,
        200,
    )
}

/// The shred queue's length, straight from the metadata DB.
async fn shred_queue_len(meta: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM shred_queue")
        .fetch_one(meta)
        .await
        .unwrap()
}

/// The data keys under `kek`, straight from the key DB.
async fn data_keys_of(key_db: &mut sqlx::PgConnection, kek: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM data_keys WHERE kek_id = $1")
        .bind(kek)
        .fetch_one(key_db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_outlast_dead_dependencies_and_nothing_unlinked_is_forgotten() {
    let _slot = slot().await;
    // Rotations after a shredding start at once here (the default gives
    // deletions an hour to share one).
    let mut s = ApiStack::start_with(&["--shred-rotation-secs", "0"]);
    let team = team(&s, "Outlast").await;
    let admin = &team.tenant.admin;
    let meta_url = s.path.infra.verified_url(&s.meta);
    let mut meta = <sqlx::PgConnection as sqlx::Connection>::connect(&meta_url)
        .await
        .unwrap();

    let key_url = s.path.infra.verified_url(&s.path.infra.key_db);
    let mut key_db = <sqlx::PgConnection as sqlx::Connection>::connect(&key_url)
        .await
        .unwrap();

    // Deleting and correcting destroy at once (the data keys leave the key
    // DB; replicas are tombstoned) and leave nothing queued.
    let keep = study(&s, admin, "Kept").await;
    let keep_kek: String = sqlx::query_scalar("SELECT kek_id FROM studies WHERE id = $1")
        .bind(&keep)
        .fetch_one(&mut meta)
        .await
        .unwrap();
    let corrected = record(&s, &team.writer, &keep, "P-1", json!({"v": 1})).await;
    let deleted = record(&s, &team.writer, &keep, "P-2", json!({"v": 2})).await;
    assert_eq!(data_keys_of(&mut key_db, &keep_kek).await, 2);
    ok(
        &s.put_json(
            &format!("/v1/records/{corrected}"),
            Some(&team.writer),
            &json!({"data": {"v": 10}}),
        )
        .await,
        200,
    );
    ok(
        &delete(&s, &format!("/v1/records/{deleted}"), Some(admin)).await,
        204,
    );
    assert_eq!(
        data_keys_of(&mut key_db, &keep_kek).await,
        1,
        "the old version's and the deleted record's keys are gone"
    );
    assert_eq!(shred_queue_len(&mut meta).await, 0);
    // ... and one rotation of the study's KEK is scheduled for both.
    let rotations: Vec<String> =
        sqlx::query_scalar("SELECT id FROM jobs WHERE kind = 'rotate_kek' AND target = $1")
            .bind(&keep)
            .fetch_all(&mut meta)
            .await
            .unwrap();
    assert_eq!(rotations.len(), 1, "one rotation for both shreddings");

    // What the API host unlinked but could not destroy (it died, or the
    // encryption host was down) is destroyed by the worker: by its sweep
    // once it has waited a minute, or by the study's rotation before it
    // rewraps anything.
    let swept = study(&s, admin, "Swept").await;
    let swept_kek: String = sqlx::query_scalar("SELECT kek_id FROM studies WHERE id = $1")
        .bind(&swept)
        .fetch_one(&mut meta)
        .await
        .unwrap();
    let old_orphan = record(&s, &team.writer, &swept, "P-4", json!({"v": 4})).await;
    let new_orphan = record(&s, &team.writer, &keep, "P-3", json!({"v": 3})).await;
    assert_eq!(data_keys_of(&mut key_db, &keep_kek).await, 2);
    assert_eq!(data_keys_of(&mut key_db, &swept_kek).await, 1);
    for (token, age_secs) in [(&old_orphan, 120.0), (&new_orphan, 0.0)] {
        sqlx::query(
            "WITH old AS (SELECT study_id, key_ref, blob_ref FROM records WHERE token = $1) \
             INSERT INTO shred_queue (study_id, key_ref, blob_ref, queued_at) \
             SELECT study_id, key_ref, blob_ref, now() - make_interval(secs => $2) FROM old",
        )
        .bind(token)
        .bind(age_secs)
        .execute(&mut meta)
        .await
        .unwrap();
        sqlx::query(
            "UPDATE records SET deleted = true, key_ref = '', blob_ref = '' WHERE token = $1",
        )
        .bind(token)
        .execute(&mut meta)
        .await
        .unwrap();
    }

    // A study deletion while the key host cannot be reached: attempts fail
    // and back off (2 s, 4 s, …) instead of using up every attempt at once.
    let doomed = study(&s, admin, "Doomed").await;
    record(&s, &team.writer, &doomed, "P-1", json!({"x": 1})).await;
    let blind = s.start_worker_with_key_host("https://127.0.0.1:1");
    let study_path = format!("/v1/studies/{doomed}");
    let job = assert_id(
        &ok(&delete(&s, &study_path, Some(admin)).await, 202)["job"],
        "job_",
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let waiting = ok(&get(&s, &format!("/v1/jobs/{job}"), Some(admin)).await, 200);
    assert_ne!(waiting["state"], "failed", "{waiting}");
    assert_ne!(waiting["state"], "succeeded", "{waiting}");
    let errors = waiting["errors"].as_i64().unwrap();
    assert!(
        (1..=3).contains(&errors),
        "backed off between attempts: {waiting}"
    );
    assert!(
        waiting.get("receipt").is_none(),
        "nothing destroyed yet: {waiting}"
    );
    // Shredding needs only the encryption host: the blind worker's sweep
    // destroyed the old orphan, and its rotation attempt the new one before
    // it failed on the key host.
    assert_eq!(shred_queue_len(&mut meta).await, 0);
    assert_eq!(
        data_keys_of(&mut key_db, &swept_kek).await,
        0,
        "the old orphan's keys are gone"
    );
    assert_eq!(
        data_keys_of(&mut key_db, &keep_kek).await,
        1,
        "the new orphan's keys are gone"
    );
    drop(blind);

    // Had it failed for good, asking again queues the same job again.
    sqlx::query(
        "UPDATE jobs SET state = 'failed', lease_until = NULL, finished_at = now() WHERE id = $1",
    )
    .bind(&job)
    .execute(&mut meta)
    .await
    .unwrap();
    let again = ok(&delete(&s, &study_path, Some(admin)).await, 202);
    assert_eq!(again["job"], job.as_str(), "the same job");
    let queued = ok(&get(&s, &format!("/v1/jobs/{job}"), Some(admin)).await, 200);
    assert_eq!(queued["state"], "queued", "{queued}");
    assert_eq!(queued["errors"], 0, "{queued}");
    // The rotation failed meanwhile too; its next attempt is made due now.
    sqlx::query("UPDATE jobs SET not_before = NULL WHERE id = $1")
        .bind(&rotations[0])
        .execute(&mut meta)
        .await
        .unwrap();
    let _worker = s.start_worker();
    let rotated = finished_job(&s, &rotations[0], admin).await;
    assert_eq!(rotated["state"], "succeeded", "{rotated}");
    assert_eq!(rotated["receipt"]["kek_rotation"], "done", "{rotated}");
    assert_eq!(rotated["receipt"]["kek_version"], 2, "{rotated}");
    assert_eq!(
        rotated["receipt"]["kek_versions_destroyed"],
        json!([1]),
        "{rotated}"
    );
    let versions: Vec<i32> =
        sqlx::query_scalar("SELECT DISTINCT kek_version FROM data_keys WHERE kek_id = $1")
            .bind(&keep_kek)
            .fetch_all(&mut key_db)
            .await
            .unwrap();
    assert_eq!(
        versions,
        [2],
        "every key of the study is under the new version"
    );
    let done = finished_job(&s, &job, admin).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["receipt"]["kek"], "destroyed", "{done}");
    assert_eq!(done["receipt"]["records_destroyed"], 1, "{done}");
    // Once shredded, the study is gone.
    error(&delete(&s, &study_path, Some(admin)).await, 404);

    // A record deleted while the key host is down: deleted for the API at
    // once (204, then 404), its keys kept on the shred queue, and destroyed
    // by the study's rotation once the key host is back.
    let key_url = s.path.keyd.url();
    s.path.keyd.kill();
    ok(
        &delete(&s, &format!("/v1/records/{corrected}"), Some(admin)).await,
        204,
    );
    error(
        &get(&s, &format!("/v1/records/{corrected}"), Some(&team.reader)).await,
        404,
    );
    assert_eq!(shred_queue_len(&mut meta).await, 1, "left for the worker");
    assert_eq!(
        data_keys_of(&mut key_db, &keep_kek).await,
        1,
        "not destroyed yet"
    );
    let rotation: String = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE kind = 'rotate_kek' AND target = $1 AND state <> 'succeeded'",
    )
    .bind(&keep)
    .fetch_one(&mut meta)
    .await
    .unwrap();
    let port = key_url.rsplit(':').next().unwrap();
    s.path.keyd = s
        .path
        .infra
        .start_keyd_on(&format!("127.0.0.1:{port}"), &[]);
    let rotated = finished_job(&s, &rotation, admin).await;
    assert_eq!(rotated["state"], "succeeded", "{rotated}");
    assert_eq!(shred_queue_len(&mut meta).await, 0);
    assert_eq!(
        data_keys_of(&mut key_db, &keep_kek).await,
        0,
        "destroyed once the key host was back"
    );
}
