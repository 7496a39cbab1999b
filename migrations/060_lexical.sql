-- Lexical retrieval: trigram similarity over concept names and synonyms (harmonia/store/lexical.py).
-- Extensions live in public and every use is schema-qualified, so a session whose search_path lacks public works.
-- Only indexes on the vocab tables (no views): a vocabulary reload copies them onto the new tables
-- (harmonia/store/vocab.py), and a view would block the DROP TABLE of the swap.
CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public;
CREATE EXTENSION IF NOT EXISTS unaccent WITH SCHEMA public;

-- unaccent() is only STABLE (its dictionary could change); the two-argument form with a fixed dictionary is safe
-- to declare IMMUTABLE, which an index expression needs. Lower case, accents off.
CREATE OR REPLACE FUNCTION vocab.lexnorm(t text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN lower(public.unaccent('public.unaccent'::regdictionary, t));

CREATE INDEX concept_name_trgm_idx ON vocab.concept USING gin (vocab.lexnorm(concept_name) public.gin_trgm_ops)
    WHERE standard_concept = 'S' AND invalid_reason IS NULL;
CREATE INDEX concept_synonym_trgm_idx ON vocab.concept_synonym
    USING gin (vocab.lexnorm(concept_synonym_name) public.gin_trgm_ops);
