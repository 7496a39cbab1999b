-- API tokens (issue 15): a user may hold several, each may expire, and logging out revokes the one used. The page
-- exchanges an API token for a session token that expires (review_session_ttl_s). Only sha256 hashes are stored.
CREATE TABLE IF NOT EXISTS harmonia.api_token (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES harmonia.users (id) ON DELETE CASCADE,
    token_hash  text NOT NULL UNIQUE,
    kind        text NOT NULL DEFAULT 'api' CHECK (kind IN ('api', 'session')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,              -- NULL: never
    revoked_at  timestamptz
);
CREATE INDEX IF NOT EXISTS api_token_user_idx ON harmonia.api_token (user_id);

-- Today's tokens keep working (no expiry), now as rows of their own.
INSERT INTO harmonia.api_token (user_id, token_hash, kind, created_at)
SELECT u.id, u.token_hash, 'api', u.created_at FROM harmonia.users u
WHERE u.token_hash IS NOT NULL ON CONFLICT (token_hash) DO NOTHING;
UPDATE harmonia.users SET token_hash = NULL WHERE token_hash IS NOT NULL;
