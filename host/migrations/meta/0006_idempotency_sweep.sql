-- The worker sweeps first answers older than 24 hours.
CREATE INDEX idempotency_by_age ON idempotency (created_at);
-- Record creations answered before answers were kept whole.
UPDATE idempotency
   SET answer = jsonb_build_object('token', token, 'created_at', to_json(created_at)#>>'{}')
 WHERE answer IS NULL AND token IS NOT NULL;
