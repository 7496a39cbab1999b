-- Sentence embeddings of concepts, one row per (concept, model). The column has no fixed dimension so models of
-- different sizes share the table; each model gets its own partial HNSW cosine index on
-- (embedding::public.vector(dim)) WHERE model = '<key>', built by `harmonia embed` once the model's dimension is
-- known (see harmonia/store/embeddings.py). No foreign key to vocab.concept: a vocabulary reload may drop concepts,
-- and retrieval joins vocab.concept anyway; `harmonia embed` deletes orphans.
CREATE TABLE vocab.embedding_model (
    model      text PRIMARY KEY,     -- model key: name plus a fingerprint of local weights
    model_name text NOT NULL,        -- the configured name or path
    dim        integer NOT NULL CHECK (dim > 0),
    index_name text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE vocab.concept_embedding (
    concept_id integer NOT NULL,
    model      text NOT NULL REFERENCES vocab.embedding_model (model) ON DELETE CASCADE,
    text_md5   text NOT NULL,        -- md5 of the embedded text: a renamed concept is re-embedded
    embedding  public.vector NOT NULL,
    PRIMARY KEY (concept_id, model)
);
CREATE INDEX concept_embedding_model_idx ON vocab.concept_embedding (model);
