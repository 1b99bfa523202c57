"""The report's summary lines, shared by the console rendering and the HTML one."""

from __future__ import annotations


def summary_items(report) -> list[tuple[str, str]]:
    """The report's summary as (label, value) lines — the one formatter behind the console and the HTML."""
    s, m = report.summary, report.measurements
    budget = {"flops": "FLOPs kept", "latency": "latency kept", "power": "power kept"}[report.budget]
    items = [
        ("hardware", f"{report.hw} — {report.hw_profile.get('description', '')}"),
        ("importance criterion", report.importance),
        *([("quantize", s["quantize"])] if "quantize" in s else []),
        (f"budget ({budget})", f"target {report.budget_target:.3f}, achieved {s['budget_achieved']:.3f}"),
        ("prunable-linear FLOPs kept", f"{s['flops_keep_achieved']:.3f} (executed {s['flops_keep_executed']:.3f})"),
        ("model FLOPs kept", f"{s['model_flops_keep']:.3f}"),
        *([("tokens per image (token pruning)", _token_line(report.token_stages))] if report.token_stages else []),
        *([("attention heads kept", ", ".join(f"{block} {len(kept)}" for block, kept in report.heads_kept.items()))]
          if report.heads_kept else []),
        (f"predicted on {report.hw} (batch {s['hw_batch_size']})",
         f"{s['compiled_speedup']:.2f}x faster, energy x{s['compiled_energy_ratio']:.2f}"),
    ]
    if "compile_gemm" in s:  # reports saved before it was recorded lack it
        items.append(("GEMM of importance and reconstruction", {"onednn": "oneDNN", "blas": "torch's BLAS (MKL)"}
                      .get(s["compile_gemm"], s["compile_gemm"]) + " (LPVIT_GEMM)"))
    if report.hw_profile.get("calibration"):
        items.append(("hardware profile", report.hw_profile["calibration"]))
    items += [("note", note) for note in report.notes]
    error = report.latency_error()
    if error is not None:
        items.append(("per-layer latency, predicted vs measured", f"median error {error:.0%}"))
    for batch, e in sorted(m.end_to_end.get("batches", {}).items(), key=lambda kv: int(kv[0])):
        items.append((f"measured end to end, batch {batch} ({m.end_to_end['threads']} threads)",
                      f"dense {e['dense_ms']:.1f} ms, compiled {e['compiled_ms']:.1f} ms: {e['speedup']:.2f}x"))
    if m.accuracy:
        a = m.accuracy
        items.append((f"top-1 on {a['data']} ({a['images']} images)",
                      f"dense {a['dense']:.4f}, compiled {a['compiled']:.4f} ({a['compiled'] - a['dense']:+.4f})"))
    return items


def _token_line(stages: list[dict]) -> str:
    counts = ", ".join(str(stage["tokens_out"]) for stage in stages)
    return f"{stages[0]['tokens_in']} into {stages[0]['block']}, then {counts} after each stage to {stages[-1]['block']}"
