-- Each embedding row carries its concept's domain, so a model can have partial HNSW indexes per small domain
-- (issue 18): a search filtered to Measurement or Drug then walks a graph of that domain only, instead of an
-- iterative scan of the whole index that reads past the other domains' rows and loses recall at millions of
-- concepts. Filled and kept in step with vocab.concept by `harmonia embed` (harmonia/store/embeddings.py
-- sync_domains), not here: updating millions of rows under their HNSW index would insert each into the graph again,
-- slower than a rebuild, so sync_domains drops and rebuilds the index when most rows change. Until then domain_id is
-- NULL and filtered searches use the whole index, as before.
-- embedding_model.domain_indexes: domain -> index name of the model's partial indexes.
ALTER TABLE vocab.concept_embedding ADD COLUMN IF NOT EXISTS domain_id text;
ALTER TABLE vocab.embedding_model ADD COLUMN IF NOT EXISTS domain_indexes jsonb NOT NULL DEFAULT '{}'::jsonb;
