//! Field tokenization: values swapped for tokens an analysis dataset can
//! hold, and back.
//!
//! - `tok_`: 128 random bits, a new one every time.
//! - `dtk_`: the same for the same value within one study (record linkage),
//!   different across studies. It is a MAC of the value under the study's
//!   linking key, which lives in the HSM: the API host first takes a keyed
//!   hash of (study, value) under its server secret, and only that hash
//!   travels (through the encryption host) to the key host. Neither host
//!   alone can compute a `dtk_` token, and the key host never sees a value.
//!
//! The values of one call are sealed together as one *field set* (token →
//! value) through the encryption host, like a record; the metadata DB maps
//! each token to its set and holds no value.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::auth::{Principal, Role, keyed_hash, participant_hash};
use super::error::{ApiError, ApiResult};
use super::idempotency;
use super::json::Body;
use super::studies::{Study, visible};
use super::vault::{Sealed, context_digest};
use super::{AppState, ids};

/// Largest single field value, in bytes.
pub const MAX_FIELD_VALUE: usize = 64 * 1024;
/// Field sets opened at once by one detokenize or export call.
const OPEN_CONCURRENCY: usize = 16;

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenizeRequest {
    participant: Option<String>,
    fields: Map<String, Value>,
    #[serde(default)]
    deterministic: Vec<String>,
}

/// What a field set seals: token → value.
#[derive(Debug, Default, serde::Serialize, Deserialize)]
struct FieldSet {
    values: BTreeMap<String, String>,
}

/// The checked values of a request, by field name; never echoed in errors.
fn values<'a>(
    limits: &super::Limits,
    request: &'a TokenizeRequest,
) -> ApiResult<Vec<(&'a str, &'a str)>> {
    if request.fields.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_fields",
            "fields must name at least one field",
        ));
    }
    limits.check_items(request.fields.len(), "a tokenize call", "fields")?;
    if let Some(p) = &request.participant
        && (p.is_empty() || p.len() > 200)
    {
        return Err(ApiError::bad_request(
            "invalid_participant",
            "participant is 1 to 200 characters",
        ));
    }
    for name in &request.deterministic {
        if !request.fields.contains_key(name) {
            return Err(ApiError::bad_request(
                "invalid_fields",
                format!("deterministic names a field that is not in fields: {name:?}"),
            ));
        }
    }
    request
        .fields
        .iter()
        .map(|(name, value)| match value.as_str() {
            Some(v) if v.len() <= MAX_FIELD_VALUE => Ok((name.as_str(), v)),
            Some(_) => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the value of field {name:?} is over {MAX_FIELD_VALUE} bytes"),
            )),
            None => Err(ApiError::bad_request(
                "invalid_fields",
                format!("the value of field {name:?} must be a string"),
            )),
        })
        .collect()
}

/// `dtk_` tokens of `values` in `study`: MACs under the study's linking key
/// in the HSM of keyed hashes made here.
async fn deterministic_tokens(
    state: &AppState,
    study: &Study,
    values: &[&str],
) -> ApiResult<Vec<String>> {
    if values.is_empty() {
        return Ok(Vec::new());
    }
    let blinded: Vec<Vec<u8>> = values
        .iter()
        .map(|v| {
            keyed_hash(
                &state.secret,
                "link",
                format!("{}\0{v}", study.id).as_bytes(),
            )
        })
        .collect();
    let macs = state.vault.link(&study.kek, &blinded).await?;
    Ok(macs
        .iter()
        .map(|mac| {
            let body = data_encoding::BASE32_NOPAD.encode(&mac[..16.min(mac.len())]);
            format!("dtk_{}", body.to_ascii_lowercase())
        })
        .collect())
}

async fn tokenize_now(
    state: &AppState,
    principal: &Principal,
    tenant: &str,
    study: &Study,
    request: &TokenizeRequest,
) -> ApiResult<Value> {
    let values = values(&state.limits, request)?;
    let linked: Vec<&str> = values
        .iter()
        .filter(|(name, _)| request.deterministic.iter().any(|d| d == name))
        .map(|(_, v)| *v)
        .collect();
    if !linked.is_empty() {
        let n = u32::try_from(linked.len()).unwrap_or(u32::MAX);
        if !state.link_limit.allow_n(&principal.key_id, n) {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many deterministic tokens for this key; retry later",
            ));
        }
    }
    let mut linked_tokens = deterministic_tokens(state, study, &linked)
        .await?
        .into_iter();
    let mut set = FieldSet::default();
    let mut answer = Map::new();
    for (name, value) in &values {
        let token = if request.deterministic.iter().any(|d| d == name) {
            linked_tokens.next().ok_or_else(bad_link_answer)?
        } else {
            ids::new("tok")
        };
        set.values.insert(token.clone(), (*value).to_owned());
        answer.insert((*name).to_owned(), Value::String(token));
    }

    let set_id = ids::new("fst");
    let hash = request
        .participant
        .as_deref()
        .map(|p| participant_hash(&state.secret, &study.id, p));
    let context = context_digest(tenant, &study.id, &set_id, hash.as_deref().unwrap_or(&[]));
    let plaintext =
        zeroize::Zeroizing::new(serde_json::to_vec(&set).map_err(|_| {
            ApiError::bad_request("invalid_fields", "the fields are not serializable")
        })?);
    let sealed = state
        .vault
        .seal(&study.kek, &context, plaintext.to_vec())
        .await?;
    if let Err(e) = record_set(
        state,
        tenant,
        study,
        &set_id,
        hash.as_deref(),
        &sealed,
        &set,
    )
    .await
    {
        // Not recorded, so not kept: shred what was sealed.
        let _ = state.vault.destroy(&sealed).await;
        return Err(e);
    }
    Ok(json!({ "fields": answer }))
}

fn bad_link_answer() -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "encryption_host_error",
        "the key host answered the wrong number of linking MACs",
    )
}

/// The set and its tokens, in one transaction.
async fn record_set(
    state: &AppState,
    tenant: &str,
    study: &Study,
    set_id: &str,
    participant_hash: Option<&[u8]>,
    sealed: &Sealed,
    set: &FieldSet,
) -> ApiResult<()> {
    let mut tx = state.db.begin().await?;
    sqlx::query(
        "INSERT INTO field_sets (id, tenant_id, study_id, participant_hash, key_ref, blob_ref) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(set_id)
    .bind(tenant)
    .bind(&study.id)
    .bind(participant_hash)
    .bind(&sealed.key_ref)
    .bind(&sealed.blob_ref)
    .execute(&mut *tx)
    .await?;
    let tokens: Vec<&String> = set.values.keys().collect();
    sqlx::query("INSERT INTO field_tokens (token, set_id) SELECT unnest($1::text[]), $2")
        .bind(&tokens)
        .bind(set_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// `POST /v1/studies/{study}/tokenize` (writer). `deterministic` fields get
/// `dtk_` tokens and need a key made with `can_link` (rate-limited per key).
pub(crate) async fn tokenize(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    super::json::Path(study): super::json::Path<String>,
    headers: HeaderMap,
    Body(request): Body<TokenizeRequest>,
) -> ApiResult<Json<Value>> {
    let tenant = principal.require(&[Role::Writer])?;
    let study = visible(&state, &principal, tenant, &study).await?;
    // Before any replay: a stored answer never hands dtk_ tokens to a key
    // that may not make them.
    if !request.deterministic.is_empty() && !principal.can_link {
        return Err(ApiError::forbidden(
            "this key may not make deterministic tokens (create it with \"can_link\": true)",
        ));
    }
    let canonical = serde_json::to_vec(&(&study.id, &request)).unwrap_or_default();
    // Answers hold tokens only: kept whole.
    let answer = idempotency::once(
        &state,
        &principal,
        &headers,
        "tokenize",
        &canonical,
        || tokenize_now(&state, &principal, tenant, &study, &request),
        Value::clone,
    )
    .await?;
    Ok(Json(answer.into_value()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DetokenizeRequest {
    tokens: Vec<String>,
}

/// A live field set of the caller's tenant.
#[derive(Debug, sqlx::FromRow)]
struct SetRow {
    id: String,
    study_id: String,
    participant_hash: Option<Vec<u8>>,
    key_ref: String,
    blob_ref: String,
}

/// The first live set holding token `w.token` (`$2` the tenant, `$3` the
/// key's studies if it is limited), with one more condition.
macro_rules! live_set {
    ($and:literal) => {
        concat!(
            "SELECT st.require_reason, s.id, s.study_id, s.participant_hash, s.key_ref, s.blob_ref \
             FROM field_tokens t JOIN field_sets s ON s.id = t.set_id JOIN studies st ON st.id = s.study_id \
             WHERE t.token = w.token AND s.tenant_id = $2 AND NOT s.deleted AND NOT st.deleted \
               AND ($3::text[] IS NULL OR s.study_id = ANY($3)) ",
            $and,
            " LIMIT 1"
        )
    };
}

/// A token, the set holding it, and whether its study requires a reason.
#[derive(Debug, sqlx::FromRow)]
struct TokenRow {
    token: String,
    require_reason: bool,
    #[sqlx(flatten)]
    set: SetRow,
}

/// Opens field sets (bounded concurrency): set id → token → value.
async fn open_sets(
    state: &AppState,
    tenant: &str,
    sets: Vec<SetRow>,
) -> ApiResult<HashMap<String, FieldSet>> {
    let opened: Vec<ApiResult<Option<(String, FieldSet)>>> = futures::stream::iter(sets)
        .map(|row| async move {
            let context = context_digest(
                tenant,
                &row.study_id,
                &row.id,
                row.participant_hash.as_deref().unwrap_or(&[]),
            );
            let sealed = Sealed {
                key_ref: row.key_ref,
                blob_ref: row.blob_ref,
            };
            let plaintext = match state.vault.open(&sealed, &context).await {
                Ok(plaintext) => zeroize::Zeroizing::new(plaintext.to_vec()),
                // Deleted since it was listed: as if it were not there.
                Err(e) if e.status == StatusCode::NOT_FOUND => return Ok(None),
                Err(e) => return Err(e),
            };
            let set: FieldSet = serde_json::from_slice(&plaintext).map_err(|_| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "record_integrity",
                    "a field set is unreadable",
                )
            })?;
            Ok(Some((row.id, set)))
        })
        .buffer_unordered(OPEN_CONCURRENCY)
        .collect()
        .await;
    opened.into_iter().filter_map(Result::transpose).collect()
}

/// `POST /v1/detokenize` (reader): up to 1,000 tokens; unknown, foreign,
/// deleted or out-of-scope tokens map to `null`.
pub(crate) async fn detokenize(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    reason: super::reason::Reason,
    Body(request): Body<DetokenizeRequest>,
) -> ApiResult<Json<Value>> {
    let tenant = principal.require(&[Role::Reader])?;
    state
        .limits
        .check_items(request.tokens.len(), "a detokenize call", "tokens")?;
    // One live set per token. A dtk_ token is in one set per tokenize call
    // of its value (thousands, for a linked id); they all agree, so the one
    // taken is a set already opened for a tok_ of the same call if there is
    // one, else the first found: index lookups either way, never a scan of
    // every set holding the token.
    let rows: Vec<TokenRow> = sqlx::query_as(concat!(
        "WITH wanted AS (SELECT DISTINCT unnest($1::text[]) AS token), \
              opened AS (SELECT set_id FROM field_tokens WHERE token = ANY($1) AND token LIKE 'tok\\_%') \
         SELECT w.token, pick.* FROM wanted w CROSS JOIN LATERAL ((",
        live_set!("AND t.set_id IN (SELECT set_id FROM opened)"),
        ") UNION ALL (",
        live_set!(""),
        ") LIMIT 1) pick",
    ))    .bind(&request.tokens)
    .bind(tenant)
    .bind(principal.studies.as_deref())
    .fetch_all(&state.db)
    .await?;
    reason.check(rows.iter().any(|row| row.require_reason))?;
    let mut set_of = HashMap::new();
    let mut sets = HashMap::new();
    for row in rows {
        set_of.insert(row.token, row.set.id.clone());
        sets.entry(row.set.id.clone()).or_insert(row.set);
    }
    let opened = open_sets(&state, tenant, sets.into_values().collect()).await?;
    let values: Map<String, Value> = request
        .tokens
        .iter()
        .map(|token| {
            let value = set_of
                .get(token)
                .and_then(|set| opened.get(set))
                .and_then(|set| set.values.get(token))
                .map_or(Value::Null, |v| Value::String(v.clone()));
            (token.clone(), value)
        })
        .collect();
    Ok(Json(json!({ "values": values })))
}

/// Every field token of one participant with its value (export).
pub(crate) async fn of_participant(
    state: &AppState,
    tenant: &str,
    study: &str,
    participant_hash: &[u8],
) -> ApiResult<Vec<Value>> {
    let sets: Vec<SetRow> = sqlx::query_as(
        "SELECT id, study_id, participant_hash, key_ref, blob_ref FROM field_sets \
         WHERE tenant_id = $1 AND study_id = $2 AND participant_hash = $3 AND NOT deleted",
    )
    .bind(tenant)
    .bind(study)
    .bind(participant_hash)
    .fetch_all(&state.db)
    .await?;
    let opened = open_sets(state, tenant, sets).await?;
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    for set in opened.into_values() {
        fields.extend(set.values);
    }
    Ok(fields
        .into_iter()
        .map(|(token, value)| json!({ "token": token, "value": value }))
        .collect())
}
