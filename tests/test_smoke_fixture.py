def test_template_has_embeddings(conn):
    n = conn.execute("SELECT count(*) FROM vocab.concept_embedding").fetchone()[0]
    assert n > 25000
