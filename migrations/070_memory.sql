-- Mapping memory: sources that are already mapped (the vocabulary's own 'Maps to' of the development part, rows of
-- approved mapping files, reviewers' decisions), embedded with a model, as a third candidate generator beside vector
-- and lexical search: a new source that reads like a mapped one gets that one's targets as candidates
-- (harmonia/memory.py). One row per (model, source); `harmonia memory build` replaces a model's rows whole. Each
-- model gets a partial HNSW cosine index (WHERE model = '<key>') when its rows are written. No foreign keys into the
-- vocabulary: a reload may drop concepts, and retrieval keeps only targets that are still valid standard concepts.
CREATE TABLE vocab.mapping_memory (
    model        text NOT NULL REFERENCES vocab.embedding_model (model) ON DELETE CASCADE,
    source_vocab text NOT NULL,
    source_code  text NOT NULL,
    source_key   text NOT NULL,     -- the benchmark split key: source concept_id, or 'vocab:code'
    source_text  text NOT NULL,
    targets      integer[] NOT NULL CHECK (cardinality(targets) > 0),
    origin       text NOT NULL CHECK (origin IN ('vocabulary', 'file', 'review')),
    embedding    public.vector NOT NULL,
    PRIMARY KEY (model, source_vocab, source_code)
);
