"""The demo's live terminal view: a pure function from a snapshot to text."""

from __future__ import annotations

from typing import Any


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} ms"


def render_view(
    group: dict[str, Any] | None,
    traffic: dict[str, float | None],
    totals: dict[str, Any],
    events: list[str],
    elapsed: float,
) -> str:
    """The screen: per-role replicas/ready, traffic and latency, recent decisions (events)."""
    lines = [f"pdorch demo: ServingGroup sim-pd    ({elapsed:,.0f}s, Ctrl-C to stop and clean up)", ""]
    status = (group or {}).get("status") or {}
    conds = {c["type"]: c for c in status.get("conditions") or []}
    avail = conds.get("Available", {})
    cur, upd = status.get("currentRevision", "-"), status.get("updateRevision", "-")
    rev = upd if cur == upd else f"{cur} -> {upd} (rolling out)"
    lines.append(f"revision {rev}   Available={avail.get('status', '-')} ({avail.get('reason', '-')})")
    prog = conds.get("Progressing", {})
    if prog.get("status") == "True":
        lines.append(f"progressing: {prog.get('message', '')}"[:150])
    lines.append(f"{'ROLE':<10} {'TYPE':<8} {'DESIRED':>7} {'READY':>5} {'UPDATED':>7} {'PARTITION':>9}")
    for r in status.get("roles") or []:
        lines.append(
            f"{r['name']:<10} {r['type']:<8} {r.get('desiredReplicas', 0):>7} {r.get('readyReplicas', 0):>5} "
            f"{r.get('updatedReplicas', 0):>7} {r.get('partition', 0):>9}"
        )
    lines += [
        "",
        f"requests/s {traffic.get('rps') or 0:6.1f}   ok {totals['ok']}   failed {totals['failed']}"
        + (f"   ({', '.join(f'{k}: {v}' for k, v in totals['errors'].items())})" if totals["errors"] else ""),
        f"TTFT p50 {_ms(traffic.get('ttft_p50_ms')):>10}   p99 {_ms(traffic.get('ttft_p99_ms')):>10}",
        f"TPOT p50 {_ms(traffic.get('tpot_p50_ms')):>10}   p99 {_ms(traffic.get('tpot_p99_ms')):>10}",
        "",
        "recent decisions (events):",
    ]
    lines += [f"  {e}" for e in events[-8:]] or ["  -"]
    return "\n".join(lines)
