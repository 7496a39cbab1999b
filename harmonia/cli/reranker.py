"""`harmonia reranker train | info`: the local classifier reranker."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from harmonia.cli.app import connect, fail, reranker_app, settings


@reranker_app.command("train")
def reranker_train(
    max_steps: int = typer.Option(0, "--max-steps", help="Stop after this many optimizer steps (0: --epochs)."),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over the training pairs."),
    base_model: str = typer.Option(None, "--base-model", help="HF name or path (default: classifier_base_model, "
                                                               "else the bundled all-MiniLM-L6-v2)."),
    layers: int = typer.Option(0, "--layers", help="Keep only the first N encoder layers of the base model (0: all); "
                                                   "fewer layers rerank faster on a CPU."),
    out: Path = typer.Option(None, "--out", help="Run folder (default <data_dir>/reranker/<timestamp>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the newest unfinished run (or --out)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    learning_rate: float = typer.Option(5e-5, "--lr"),
    max_length: int = typer.Option(None, "--max-length", help="Token limit per pair (default: "
                                                              "classifier_max_length)."),
    max_sources: int = typer.Option(0, "--max-sources", help="Use at most this many development sources (0: all)."),
    hard_negatives: int = typer.Option(4, "--hard-negatives", help="Hard negatives per source."),
    random_negatives: int = typer.Option(1, "--random-negatives", help="Random negatives per source."),
    source_vocab: list[str] = typer.Option([], "--source-vocab", help="Only sources of these vocabularies."),
    holdout: float = typer.Option(0.3, "--holdout", help="Share of development sources kept out of the "
                                  "cross-encoder's training: the stacker, the metrics and the calibration are fit "
                                  "on them."),
    holdout_max: int = typer.Option(2000, "--holdout-max", help="At most this many held-out sources."),
    save_every: int = typer.Option(200, "--save-every", help="Save resumable state every N steps."),
    seed: int = typer.Option(13, "--seed"),
    no_reviews: bool = typer.Option(False, "--no-reviews", help="Leave reviewers' decisions out."),
    pairs_from: list[Path] = typer.Option([], "--pairs-from", help="Also train on the development-part rows of "
                                          "this mapping file (a Usagi export or a benchmark set; repeatable)."),
    pairs_kind: str = typer.Option("", "--pairs-kind", help="The kind of those files' sources (labs, drugs, ...; "
                                   "default: each source vocabulary's declared kind)."),
    loss: str = typer.Option("bce", "--loss", help="bce, or listwise (BCE plus a softmax over each source's "
                             "candidates: trains the ranking within a source)."),
) -> None:
    """Fine-tune the cross-encoder on development 'Maps to' pairs and review decisions; point `latest` at it."""
    from harmonia.rerank.classifier.train import TrainError, TrainOptions, train

    s = settings()
    opts = TrainOptions(base_model=base_model or "", layers=layers, epochs=epochs, max_steps=max_steps,
                        batch_size=batch_size,
                        learning_rate=learning_rate, max_length=max_length or s.classifier.max_length, seed=seed,
                        hard_negatives=hard_negatives, random_negatives=random_negatives, max_sources=max_sources,
                        source_vocabularies=list(source_vocab), save_every=save_every, holdout=holdout,
                        holdout_max=holdout_max,
                        include_reviews=not no_reviews, loss=loss,
                        pairs_from=[str(p) for p in pairs_from], pairs_kind=pairs_kind)
    if loss not in ("bce", "listwise"):
        fail(f"--loss must be bce or listwise, not {loss!r}")
    if opts.batch_size < 1 or opts.epochs < 0 or opts.max_steps < 0:
        fail("--batch-size must be at least 1, --epochs and --max-steps not negative")
    try:
        with connect(s) as conn:
            r = train(conn, s, opts, out=out, resume=resume)
    except TrainError as exc:
        fail(str(exc))
    typer.echo(f"trained {r.steps} steps ({'resumed at ' + str(r.resumed_from) + ', ' if r.resumed_from else ''}"
               f"{r.seconds:.0f}s) on {r.counts.get('pairs', 0):,} pairs from {r.counts.get('train_sources', 0):,} "
               f"development sources")
    if r.metrics:
        m = r.metrics
        typer.echo(f"held-out dev ({m['sources']} sources), top-1 / top-5 / MRR:")
        final = "classifier (stacker, out of fold)" if r.stacked else "classifier (= the line above)"
        for name, label in (("none", "retrieval order"), ("cross_encoder", "cross-encoder alone"),
                            ("fused", f"cross-encoder + {r.retrieval_weight:g} x retrieval score"),
                            ("classifier", final)):
            if f"{name}_top1" in m:
                typer.echo(f"  {label:<42} {m[name + '_top1']:.3f} / {m[name + '_top5']:.3f} / "
                           f"{m[name + '_mrr']:.3f}")
    for kind, f in r.trust.figures.items():
        typer.echo(f"  kind {kind}: {f.sources} held-out sources, top-1 {f.none_top1:.3f} (retrieval order) -> "
                   f"{f.classifier_top1:.3f}, {f.wins} won / {f.losses} lost, p={f.p_value:.3g}: "
                   + ("ranks it" if f.trusted else "keeps retrieval order for it"))
    typer.echo(f"checkpoint classifier:{r.checkpoint_hash} at {r.run_dir} (now latest)")


@reranker_app.command("info")
def reranker_info() -> None:
    """Show the checkpoint `reranker = classifier` would use, with its model card."""
    from harmonia.rerank.classifier.checkpoint import CheckpointError, checkpoint_from_settings

    try:
        ck = checkpoint_from_settings(settings())
    except CheckpointError as exc:
        fail(str(exc))
    card = ck / "model_card.json"
    typer.echo(str(ck))
    if card.exists():
        typer.echo(json.dumps({k: v for k, v in json.loads(card.read_text()).items() if k != "options"}, indent=1))
