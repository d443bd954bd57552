"""Validation gates: a run's quality thresholds (``min_psnr``, ``min_ssim``, ``max_latent_error``) against its
report. validate checks them; the CLI, export and push-to-hub read the verdict."""

from __future__ import annotations


def check_gates(config, summary: dict) -> dict:
    """Each gate ``config`` (a validation section) sets: its threshold, the value measured and whether it passed."""
    gates = {}
    for name, key, better in (("min_psnr", "psnr", "higher"), ("min_ssim", "ssim", "higher"),
                              ("max_latent_error", "latent_error", "lower")):
        threshold = getattr(config, name)
        if threshold is None:
            continue
        value = summary[key]
        passed = value >= threshold if better == "higher" else value <= threshold
        gates[name] = {"threshold": threshold, "value": value, "passed": passed}
    return gates


def failed_gates(report: dict) -> str:
    """``min_psnr: 46.7 < 99`` for each gate of a report that failed, joined ("" when none did)."""
    failed = []
    for name, gate in report["gates"].items():
        if not gate["passed"]:
            failed.append(f"{name}: {gate['value']:.4g} {'>' if name.startswith('max') else '<'} {gate['threshold']}")
    return "; ".join(failed)
