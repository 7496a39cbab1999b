"""`harmonia calibrate sample | fit | status`: calibrate a source set from reviewers' verdicts (issue 14)."""

from __future__ import annotations

import json

import typer
from rich.console import Console

from harmonia.cli.app import calibrate_app, connect, fail, settings

console = Console()


@calibrate_app.command("sample")
def sample(source_vocab: str = typer.Option(..., help="The source set (its source vocabulary)."),
           n: int = typer.Option(200, help="Decisions to put in front of reviewers."),
           seed: int = typer.Option(0, help="Seed of the random sample.")) -> None:
    """Put a random sample of the set's pending decisions, stratified by confidence, at the head of the review
    queue (replacing an earlier sample of the set)."""
    from harmonia.pipeline.review_calibration import ReviewCalibrationError
    from harmonia.pipeline.review_calibration import sample as draw

    if n < 1:
        fail(f"--n {n}: must be at least 1")
    s = settings()
    with connect(s) as conn:
        try:
            r = draw(conn, source_vocab, n, seed=seed)
        except ReviewCalibrationError as exc:
            fail(str(exc))
    console.print(f"{source_vocab}: {r.sampled_high + r.sampled_low} of {r.pending} pending decisions "
                  f"({r.model_version}) sampled: {r.sampled_high} from the upper stratum (confidence >= "
                  f"{r.floor:.4f}), {r.sampled_low} below; they now head the review queue"
                  + (f" (replacing a sample of {r.replaced})" if r.replaced else "") + ". When reviewers have "
                  f"judged them: `harmonia calibrate fit --source-vocab {source_vocab}`.", markup=False)


@calibrate_app.command("fit")
def fit(source_vocab: str = typer.Option(..., help="The source set (its source vocabulary)."),
        target: float = typer.Option(None, help="Precision to certify (default: bench_target_precision, 0.98)."),
        alpha: float = typer.Option(0.05, help="1 - confidence level of the lower bound."),
        approve: bool = typer.Option(True, "--approve/--no-approve",
                                     help="Approve the set's pending decisions at or above the new threshold.")
        ) -> None:
    """Certify the set's threshold from the reviewers' verdicts on its sample, store it, and approve the set's
    pending decisions at or above it (each with a history entry naming the calibration)."""
    from harmonia.kinds import KindRegistry
    from harmonia.pipeline.review_calibration import ReviewCalibrationError
    from harmonia.pipeline.review_calibration import fit as fit_set

    s = settings()
    target = s.benchmark.target_precision if target is None else target
    if not 0.0 < target < 1.0 or not 0.0 < alpha < 0.5:
        fail(f"--target {target} must be in (0, 1) and --alpha {alpha} in (0, 0.5)")
    with connect(s) as conn:
        try:
            r = fit_set(conn, source_vocab, target=target, alpha=alpha, approve=approve,
                        floor=s.router.auto_approve_threshold, kinds=KindRegistry.from_settings(s, conn))
        except ReviewCalibrationError as exc:
            fail(str(exc))
    if r.threshold is None:
        console.print(f"{source_vocab}: no threshold certified ({r.reason}); calibration #{r.calibration_id} "
                      "stored: nothing of this set is auto-approved", markup=False)
        return
    console.print(f"{source_vocab} ({r.kind}): threshold {r.threshold:.4f}, lower bound {r.bound:.4f} on "
                  f"{r.rows_behind} reviewed decisions ({r.rows_correct} right of {r.judged_high} judged in the "
                  f"upper stratum), expected coverage {r.coverage:.1%}; calibration #{r.calibration_id}; "
                  f"{r.approved} pending decisions approved", markup=False)


@calibrate_app.command("status")
def status(source_vocab: str = typer.Option(..., help="The source set (its source vocabulary)."),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """How far reviewers are with the set's sample, and its calibration."""
    from harmonia.pipeline.review_calibration import progress

    s = settings()
    with connect(s) as conn:
        p = progress(conn, source_vocab, target=s.benchmark.target_precision)
    if as_json:
        print(json.dumps(p.to_dict(), default=str))
        return
    console.print(f"{source_vocab}: {p.judged} of {p.sampled} sampled decisions judged; upper stratum "
                  f"{p.high_judged} of {p.high} judged, {p.high_right} right (at least {p.needed} needed); "
                  + (f"calibrated: threshold {p.threshold}" if p.calibrated_at else "not calibrated from reviews"),
                  markup=False)
