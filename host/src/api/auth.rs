//! API keys: random secrets, stored only as keyed hashes, compared in
//! constant time, with a role, optional study scope and expiry.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::AppState;
use super::error::ApiError;
use super::ids;

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The whole installation: tenants.
    Operator,
    /// Studies, API keys, deletion.
    Admin,
    /// Store, correct, tokenize.
    Writer,
    /// Read, detokenize, export.
    Reader,
    /// Audit log, access reports.
    Auditor,
}

impl Role {
    /// Parses a tenant role (the operator is configured, never created).
    pub fn parse_tenant_role(text: &str) -> Option<Self> {
        match text {
            "admin" => Some(Self::Admin),
            "writer" => Some(Self::Writer),
            "reader" => Some(Self::Reader),
            "auditor" => Some(Self::Auditor),
            _ => None,
        }
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Admin => "admin",
            Self::Writer => "writer",
            Self::Reader => "reader",
            Self::Auditor => "auditor",
        }
    }
}

/// The authenticated caller.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The key's id (`operator` for the operator key).
    pub key_id: String,
    /// The tenant, for every role but the operator.
    pub tenant: Option<String>,
    /// The role.
    pub role: Role,
    /// Studies the key is limited to, if any.
    pub studies: Option<Vec<String>>,
    /// Whether the key may make deterministic (`dtk_`) field tokens.
    pub can_link: bool,
}

impl Principal {
    /// The caller's tenant if its role is one of `allowed`, else 403.
    pub fn require(&self, allowed: &[Role]) -> Result<&str, ApiError> {
        if !allowed.contains(&self.role) {
            return Err(ApiError::forbidden(format!(
                "the {} role may not make this call",
                self.role.as_str()
            )));
        }
        self.tenant
            .as_deref()
            .ok_or_else(|| ApiError::forbidden("the operator key manages tenants only"))
    }

    /// 403 unless the key may use `study`.
    pub fn require_study(&self, study: &str) -> Result<(), ApiError> {
        match &self.studies {
            Some(studies) if !studies.iter().any(|s| s == study) => Err(ApiError::forbidden(
                "this key is not allowed for this study",
            )),
            _ => Ok(()),
        }
    }
}

/// Keyed hash of a secret (API key secrets, participant ids): HMAC-SHA256
/// under the server secret, so a stolen metadata DB reveals neither.
pub fn keyed_hash(secret_key: &[u8], domain: &str, value: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new_from_slice(secret_key)
        .expect("any key length");
    mac.update(domain.as_bytes());
    mac.update(&[0]);
    mac.update(value);
    mac.finalize().into_bytes().to_vec()
}

/// The stored form of a participant id: a keyed hash, per study, so the
/// same person in two studies is not linkable through the metadata DB.
pub fn participant_hash(secret_key: &[u8], study: &str, participant: &str) -> Vec<u8> {
    keyed_hash(
        secret_key,
        "participant",
        format!("{study}\0{participant}").as_bytes(),
    )
}

/// Constant-time check of a secret against its stored keyed hash.
pub fn verify_secret(secret_key: &[u8], secret: &str, stored: &[u8]) -> bool {
    let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new_from_slice(secret_key)
        .expect("any key length");
    mac.update(b"api-key");
    mac.update(&[0]);
    mac.update(secret.as_bytes());
    mac.verify_slice(stored).is_ok()
}

/// A new key: its id and the secret shown once (`<id>.<256 random bits>`).
pub fn new_key_secret() -> (String, Zeroizing<String>) {
    let id = ids::new("key");
    let secret = Zeroizing::new(format!("{id}.{}", ids::random_base32(32)));
    (id, secret)
}

/// An API key as stored, with whether it is refused (revoked, expired, or
/// its tenant deleted).
#[derive(sqlx::FromRow)]
struct KeyRow {
    tenant_id: String,
    role: String,
    studies: Option<Vec<String>>,
    can_link: bool,
    secret_hash: Vec<u8>,
    refused: bool,
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

impl FromRequestParts<std::sync::Arc<AppState>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &std::sync::Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauthorized("an API key is required: Authorization: Bearer <key>"))?;
        let bearer = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| unauthorized("use Authorization: Bearer <key>"))?
            .trim();
        if verify_secret(&state.secret, bearer, &state.operator_hash) {
            return Ok(Principal {
                key_id: "operator".into(),
                tenant: None,
                role: Role::Operator,
                studies: None,
                can_link: false,
            });
        }
        let Some((id, _)) = bearer.split_once('.') else {
            return Err(unauthorized("unknown API key"));
        };
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT k.tenant_id, k.role, k.studies, k.can_link, k.secret_hash, \
                    (k.revoked OR t.deleted OR (k.expires_at IS NOT NULL AND k.expires_at <= now())) AS refused \
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.id = $1",
        )
        .bind(id)
        .fetch_optional(&state.db)
        .await?;
        let Some(KeyRow {
            tenant_id: tenant,
            role,
            studies,
            can_link,
            secret_hash: hash,
            refused,
        }) = row
        else {
            return Err(unauthorized("unknown API key"));
        };
        // Checked before the refusal flags so timing does not tell a wrong
        // secret from a revoked key.
        let genuine = verify_secret(&state.secret, bearer, &hash);
        if !genuine || refused {
            return Err(unauthorized("unknown, revoked or expired API key"));
        }
        // Minute precision is enough for `last_used_at`, and spares the
        // metadata DB a committed write on every request.
        sqlx::query(
            "UPDATE api_keys SET last_used_at = now() WHERE id = $1 \
             AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
        )
        .bind(id)
        .execute(&state.db)
        .await?;
        let role = Role::parse_tenant_role(&role).ok_or_else(|| unauthorized("unknown API key"))?;
        Ok(Principal {
            key_id: id.to_owned(),
            tenant: Some(tenant),
            role,
            studies,
            can_link,
        })
    }
}
