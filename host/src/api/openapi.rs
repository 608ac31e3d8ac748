//! `GET /v1/openapi.json`: the machine-readable description of the calls
//! this API host serves (kept next to the router; a test checks they agree).

use serde_json::{Value, json};

fn error_responses() -> Value {
    let error = json!({"$ref": "#/components/responses/Error"});
    json!({"400": error, "401": error, "403": error, "404": error, "413": error, "415": error, "503": error})
}

fn op(summary: &str, role: &str, body: Option<&str>, ok: (&str, &str)) -> Value {
    let mut responses = error_responses();
    responses[ok.0] = json!({"description": ok.1, "content": {"application/json": {"schema": {"type": "object"}}}});
    let mut op = json!({
        "summary": summary,
        "description": format!("Role: {role}."),
        "security": [{"bearer": []}],
        "responses": responses,
    });
    if let Some(schema) = body {
        op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    }
    op
}

fn param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

/// The document.
pub fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Coffer API", "version": "1", "description": "See shared/API.md. Every response carries Strict-Transport-Security and x-request-id. Every write honours an Idempotency-Key header (24 h, per API key): the same key and body answer the first answer and store nothing twice, another body is 409 idempotency_key_reused. A replayed tenant or API-key creation answers the same id without the secret (shown once, kept nowhere). Reads take ?reason= (purpose of use); a study with require_reason refuses reads without it (400 reason_required)."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {"description": "An error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
                    "required": ["code", "message", "request_id"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "request_id": {"type": "string"}}}}},
                "NewTenant": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
                "NewKey": {"type": "object", "required": ["role"], "properties": {
                    "role": {"enum": ["admin", "writer", "reader", "auditor"]},
                    "studies": {"type": "array", "items": {"type": "string"}},
                    "name": {"type": "string"}, "expires_at": {"type": "string", "format": "date-time"},
                    "can_link": {"type": "boolean"}}},
                "NewStudy": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "require_reason": {"type": "boolean"}}},
                "NewRecord": {"type": "object", "required": ["participant", "data"], "properties": {
                    "participant": {"type": "string"}, "kind": {"type": "string"}, "data": {"type": "object"}}},
                "Batch": {"type": "object", "required": ["records"], "properties": {"records": {"type": "array", "maxItems": 1000, "items": {"$ref": "#/components/schemas/NewRecord"}}}},
                "Correction": {"type": "object", "required": ["data"], "properties": {"data": {"type": "object"}}},
                "Tokenize": {"type": "object", "required": ["fields"], "properties": {
                    "participant": {"type": "string"},
                    "fields": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 65536}, "maxProperties": 1000},
                    "deterministic": {"type": "array", "items": {"type": "string"}, "description": "fields that get dtk_ tokens (needs a can_link key)"}}},
                "Detokenize": {"type": "object", "required": ["tokens"], "properties": {"tokens": {"type": "array", "maxItems": 1000, "items": {"type": "string"}}}}
            }
        },
        "paths": {
            "/healthz": {"get": {"summary": "The process is up", "responses": {"200": {"description": "up"}}}},
            "/readyz": {"get": {"summary": "Encryption host, key host and W blob nodes answer", "responses": {"200": {"description": "ready"}, "503": {"$ref": "#/components/responses/Error"}}}},
            "/metrics": {"get": {"summary": "Prometheus text format", "responses": {"200": {"description": "metrics"}}}},
            "/v1/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
            "/v1/tenants": {"post": op("Create a tenant and its first admin key (shown once)", "operator", Some("NewTenant"), ("201", "{id, name, admin_key}"))},
            "/v1/tenants/{tenant}": {"parameters": [param("tenant")], "delete": op("Delete a tenant: every study crypto-shredded by a job", "operator", None, ("202", "{job}"))},
            "/v1/jobs/{job}": {"parameters": [param("job")], "get": op("A job's progress and receipt", "any role of the job's tenant", None, ("200", "{id, kind, state, done, total, errors, started_at, finished_at, receipt?}"))},
            "/v1/studies/{study}": {"parameters": [param("study")], "delete": op("Delete a study: its KEK destroyed in the HSM first, then rows collected, by a job", "admin", None, ("202", "{job}"))},
            "/v1/api-keys": {
                "post": op("Create an API key (secret shown once)", "admin", Some("NewKey"), ("201", "{id, secret, role}")),
                "get": op("List the tenant's keys, never their secrets", "admin", None, ("200", "{keys: [...]}"))
            },
            "/v1/api-keys/{id}": {"parameters": [param("id")], "delete": op("Revoke a key", "admin", None, ("204", "revoked"))},
            "/v1/studies": {
                "post": op("Create a study (its own KEK in the HSM)", "admin", Some("NewStudy"), ("201", "{id, name, created_at}")),
                "get": op("List the tenant's studies", "any tenant role", None, ("200", "{studies: [...]}"))
            },
            "/v1/studies/{study}/records": {"parameters": [param("study")], "post": op("Store a JSON record", "writer", Some("NewRecord"), ("201", "{token, participant, kind, version, created_at}"))},
            "/v1/studies/{study}/records:batch": {"parameters": [param("study")], "post": op("Store up to 1,000 records; one result per item, in order", "writer", Some("Batch"), ("200", "{results: [{token} | {error}]}"))},
            "/v1/studies/{study}/tokenize": {"parameters": [param("study")], "post": op("Swap field values for tokens: tok_ random, dtk_ deterministic per study (HSM linking key; needs can_link; rate-limited per key)", "writer", Some("Tokenize"), ("200", "{fields: {name: token}}"))},
            "/v1/detokenize": {"post": op("Values of up to 1,000 field tokens; unknown or foreign tokens map to null", "reader", Some("Detokenize"), ("200", "{values: {token: value | null}}"))},
            "/v1/studies/{study}/participants/{participant}": {
                "parameters": [param("study"), param("participant")],
                "delete": op("Delete everything held for one participant (a job: keys, every replica, metadata, then a rotation of the study KEK; receipt kek_rotation pending -> done)", "admin", None, ("202", "{job}"))
            },
            "/v1/studies/{study}/participants/{participant}/export": {
                "parameters": [param("study"), param("participant")],
                "get": op("Everything held for one participant, decrypted", "reader", None, ("200", "{participant, records, blobs, fields}"))
            },
            "/v1/studies/{study}/blobs": {"parameters": [param("study"), {"name": "participant", "in": "query", "required": true, "schema": {"type": "string"}}],
                "put": {"summary": "Store a BLOB, streamed (raw bytes, any content-type, up to 16 GiB)", "description": "Role: writer.",
                        "security": [{"bearer": []}], "requestBody": {"required": true, "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                        "responses": {"201": {"description": "{token, size, content_type, sha256}"}, "413": {"$ref": "#/components/responses/Error"}}}},
            "/v1/blobs/{token}": {"parameters": [param("token")],
                "get": {"summary": "The BLOB's bytes, streamed; a single Range is honoured", "description": "Role: reader.", "security": [{"bearer": []}],
                        "responses": {"200": {"description": "the bytes"}, "206": {"description": "the range"}, "404": {"$ref": "#/components/responses/Error"}, "416": {"$ref": "#/components/responses/Error"}}},
                "delete": op("Delete a BLOB: keys, every replica, metadata", "admin", None, ("204", "deleted"))},
            "/v1/records/{token}": {
                "parameters": [param("token")],
                "get": op("Read a record", "reader", None, ("200", "{token, study, participant, kind, version, data, created_at}")),
                "put": op("Correct a record: new keys, new blob, the old version destroyed", "writer", Some("Correction"), ("200", "{token, version}")),
                "delete": op("Delete a record: keys, every replica, metadata", "admin", None, ("204", "deleted"))
            }
        }
    })
}
