-- Source kinds (issue 14): what each source set is, as declared with `harmonia map FILE --source-vocab X --kind K`
-- (or `harmonia kinds set`). The configuration's [sources.X] tables and the built-in kinds of well-known source
-- vocabularies (ICD10 -> diagnosis, ...) need no row here; a row here overrides a built-in, the configuration
-- overrides a row.
CREATE TABLE IF NOT EXISTS harmonia.source_set (
    source_vocab  text PRIMARY KEY,
    kind          text NOT NULL CHECK (kind <> ''),
    declared_by   text NOT NULL DEFAULT '',
    declared_at   timestamptz NOT NULL DEFAULT now()
);
