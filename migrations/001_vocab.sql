-- OMOP CDM v5.4 vocabulary tables, in their own schema. Loaded by `harmonia vocab load` (COPY into staging
-- tables, then swapped in one transaction). Column types follow the CDM DDL, with text instead of varchar(20|50) so
-- that local vocabularies with longer ids (e.g. mimiciv_meas_lab_loinc) load too.
CREATE SCHEMA IF NOT EXISTS vocab;
CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public;

CREATE TABLE vocab.concept (
    concept_id       integer PRIMARY KEY,
    concept_name     text NOT NULL,
    domain_id        text NOT NULL,
    vocabulary_id    text NOT NULL,
    concept_class_id text NOT NULL,
    standard_concept varchar(1),
    concept_code     text NOT NULL,
    valid_start_date date NOT NULL,
    valid_end_date   date NOT NULL,
    invalid_reason   varchar(1)
);
CREATE INDEX concept_vocab_code_idx ON vocab.concept (vocabulary_id, concept_code);
CREATE INDEX concept_standard_idx ON vocab.concept (vocabulary_id) WHERE standard_concept = 'S' AND invalid_reason IS NULL;

CREATE TABLE vocab.concept_relationship (
    concept_id_1     integer NOT NULL,
    concept_id_2     integer NOT NULL,
    relationship_id  text NOT NULL,
    valid_start_date date NOT NULL,
    valid_end_date   date NOT NULL,
    invalid_reason   varchar(1)
);
CREATE INDEX concept_relationship_1_idx ON vocab.concept_relationship (concept_id_1, relationship_id);
CREATE INDEX concept_relationship_2_idx ON vocab.concept_relationship (concept_id_2);

CREATE TABLE vocab.concept_synonym (
    concept_id           integer NOT NULL,
    concept_synonym_name text NOT NULL,
    language_concept_id  integer NOT NULL
);
CREATE INDEX concept_synonym_concept_idx ON vocab.concept_synonym (concept_id);

CREATE TABLE vocab.concept_ancestor (
    ancestor_concept_id      integer NOT NULL,
    descendant_concept_id    integer NOT NULL,
    min_levels_of_separation integer NOT NULL,
    max_levels_of_separation integer NOT NULL
);
CREATE INDEX concept_ancestor_anc_idx ON vocab.concept_ancestor (ancestor_concept_id);
CREATE INDEX concept_ancestor_desc_idx ON vocab.concept_ancestor (descendant_concept_id);

CREATE TABLE vocab.vocabulary (
    vocabulary_id         text PRIMARY KEY,
    vocabulary_name       text NOT NULL,
    vocabulary_reference  text,
    vocabulary_version    text,
    vocabulary_concept_id integer NOT NULL
);

CREATE TABLE vocab.domain (
    domain_id         text PRIMARY KEY,
    domain_name       text NOT NULL,
    domain_concept_id integer NOT NULL
);

CREATE TABLE vocab.concept_class (
    concept_class_id         text PRIMARY KEY,
    concept_class_name       text NOT NULL,
    concept_class_concept_id integer NOT NULL
);

CREATE TABLE vocab.relationship (
    relationship_id         text PRIMARY KEY,
    relationship_name       text NOT NULL,
    is_hierarchical         varchar(1) NOT NULL,
    defines_ancestry        varchar(1) NOT NULL,
    reverse_relationship_id text NOT NULL,
    relationship_concept_id integer NOT NULL
);

-- What was loaded, when, from where (one row per `harmonia vocab load`).
CREATE TABLE vocab.load_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    loaded_at  timestamptz NOT NULL DEFAULT now(),
    source_dir text NOT NULL,
    row_counts jsonb NOT NULL
);
