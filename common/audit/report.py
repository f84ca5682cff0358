"""Rendering an :class:`~common.audit.recompute.AuditReport`: text table, JSON, HTML.

The HTML page is self-contained: plots are PNGs drawn with matplotlib's Agg
backend and embedded as base64, the styles are inline, nothing is fetched.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from pathlib import Path

from common.audit.checks import HAZARDS, Hazard
from common.audit.recompute import AuditReport, RunAudit, SiteAudit

log = logging.getLogger(__name__)


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _rng(r, digits: int = 3) -> str:
    if not r:
        return "n/a"
    lo, hi = r
    return f"{lo:.{digits}g}" if lo == hi else f"{lo:.{digits}g}–{hi:.{digits}g}"


def per_patient(s: SiteAudit) -> str:
    """The ε per patient: the site's own ε where its unit is the patient, the
    group-privacy ε where it is the record and it declares k > 1 records per patient."""
    if s.unit == "patient":
        return _f(s.epsilon.get("replace_one"))
    if s.group_privacy:
        return f"{s.group_privacy['epsilon']:.3f} (k={s.group_privacy['k']})"
    return "n/a"


def site_row(s: SiteAudit) -> dict[str, str]:
    errors = sum(h.severity == "error" for h in s.hazards)
    warnings = sum(h.severity == "warning" for h in s.hazards)
    return {
        "site": s.site, "rounds": str(s.rounds), "steps": str(s.total_steps),
        "σ": _rng(s.sigma_range), "q": _rng(s.q_range),
        "δ": "n/a" if s.delta is None else f"{s.delta:g}",
        "N": "n/a" if s.dataset_size is None else str(s.dataset_size),
        "unit": s.unit,
        "ε replace-one": _f(s.epsilon.get("replace_one")),
        "ε per patient": per_patient(s),
        "ε add/rm PRV": _f(s.epsilon.get("prv")), "PLD": _f(s.epsilon.get("pld")),
        "RDP": _f(s.epsilon.get("rdp")), "reported": _f(s.epsilon_reported),
        "cap": _f(s.cap, 2), "chain": s.chain or ("ok" if s.chain_ok else "BROKEN"),
        "anchors": str(s.anchors_matched), "unanchored": str(s.unanchored),
        "status": s.status, "hazards": f"{errors}E {warnings}W",
    }


def unit_lines(s: SiteAudit) -> list[str]:
    """Each site's ε with its unit, and for a record-level site that declares up to
    k records per patient, the group-privacy ε per patient beside it."""
    if "replace_one" not in s.epsilon:
        return []
    line = (f"site {s.site}: ε = {s.epsilon['replace_one']:.3f} per {s.unit} (replace-one, "
            f"δ={s.delta:g})")
    if s.group_privacy:
        g = s.group_privacy
        line += (f"; a patient with up to {g['k']} records at this site: ε = {g['epsilon']:.3f}, "
                 f"δ = {g['delta']:.3g} (group privacy: k·ε, k·e^((k−1)ε)·δ)")
    return [line]


def banner_lines(report: AuditReport) -> list[str]:
    """What the auditor accepted without verification: the report's banner."""
    lines = []
    for flag, hazards in report.accepted().items():
        codes = sorted({h.code for h in hazards})
        sites = sorted({h.site for h in hazards if h.site is not None})
        lines.append(f"ACCEPTED WITHOUT VERIFICATION ({flag}): {len(hazards)} finding(s) "
                     f"[{', '.join(codes)}] at site(s) {', '.join(sites) or 'n/a'}: "
                     + "; ".join(HAZARDS[c].meaning for c in codes))
    return lines


def _released(s: SiteAudit, r: dict) -> str:
    unit = f", per {s.unit}" if r["field"] == "epsilon" else ""
    return f"{r['field']}={_value(r['value'])} [{r['class']}{unit}]"


_BAD_CHAIN = ("broken", "unreadable", "missing", "legacy", "unsealed", "signed, unverified")


def _value(v) -> str:
    return _f(v, 4) if isinstance(v, float) else str(v)


def format_text(report: AuditReport) -> str:
    """The per-site table and the hazards, for a terminal."""
    lines = [*banner_lines(report),
             f"unit of privacy: {report.unit_of_privacy}",
             f"trust model: {report.trust_model}", f"signatures: {report.signatures}", ""]
    for run in report.runs:
        head = f"== {run.label}"
        if run.run_id:
            head += f" (run {run.run_id}, {run.mode}, dp={run.dp})"
        lines.append(head + " ==")
        if run.sites:
            rows = [site_row(s) for s in run.sites]
            cols = list(rows[0])
            width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
            lines.append("  ".join(c.rjust(width[c]) for c in cols))
            lines += ["  ".join(r[c].rjust(width[c]) for c in cols) for r in rows]
            for s in run.sites:
                lines += unit_lines(s)
        else:
            lines.append("(no DP ledgers)")
        lines += [f"note: {n}" for n in run.notes]
        if run.final.get("accuracy") is not None:
            lines.append(f"test accuracy {_f(run.final['accuracy'])}  AUC {_f(run.final['auc'])}")
        for s in run.sites:
            if s.released:
                lines.append(f"site {s.site} released: " + ", ".join(
                    _released(s, r) for r in s.released))
        lines.append("")
    for e in report.empirical:
        lines += empirical_lines(e) + [""]
    hazards = report.all_hazards()
    lines.append(f"hazards: {sum(h.severity == 'error' for h in hazards)} error(s), "
                 f"{sum(h.severity == 'warning' for h in hazards)} warning(s)")
    for h in sorted(hazards, key=lambda h: h.severity != "error"):
        where = f"site {h.site}: " if h.site is not None else ""
        lines.append(f"  [{h.severity.upper()}] {h.code}: {where}{h.message}")
    lines += ["", report.accountants, *(f"assumption: {a}" for a in report.assumptions)]
    return "\n".join(lines)


def empirical_lines(e: dict) -> list[str]:
    mech, power = e["mechanism"], e["power"]
    ratio = power["smallest_ratio_caught"]
    lines = [
        f"empirical audit, site {e['site']} of {e['run']} ({e['records']} records, "
        f"{power['canaries']} gradient canaries, {power['seconds']:.1f} s): the site's mechanism "
        f"σ={mech['noise_multiplier']:.3f}, q={mech['sample_rate']:.4g}, {mech['steps']} steps, "
        f"clip {mech['clip_norm']:g}, δ={mech['delta']:g} (ε add/remove, per record)",
    ]
    for run in [e["dp"], *e["controls"]]:
        verdict = "CAUGHT" if run["caught"] else "not caught"
        lines.append(f"  {run['label']:<18} σ={run['noise_multiplier']:.3f}: true ε "
                     f"{run['epsilon_true']:.3f}, claimed {run['epsilon_claimed']:.3f}, proven "
                     f"ε ≥ {run['epsilon_lower']:.3f} ({run['v']}/{run['r']} right) -> {verdict}")
    lines.append(f"  power: catches a true/claimed ε ratio of {ratio:.2f} at "
                 f"{power['confidence']:.0%}" if ratio is not None else
                 "  power: caught none of the mis-calibrated controls")
    return lines


def to_json(report: AuditReport) -> str:
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)


# -- plots -----------------------------------------------------------------
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_cumulative(run: RunAudit) -> str | None:
    """Cumulative ε (PLD, replace-one) per site over its ledger entries, against each cap."""
    sites = [s for s in run.sites if s.cumulative]
    if not sites:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    caps = set()
    for i, s in enumerate(sites):
        color = f"C{i % 10}"
        xs = list(range(len(s.cumulative) + 1))
        ys = [0.0] + [p["epsilon"] for p in s.cumulative]
        ax.plot(xs, ys, marker="o", color=color, label=f"site {s.site} (per {s.unit})")
        if s.cap is not None and s.cap not in caps:
            caps.add(s.cap)
            ax.axhline(s.cap, color="crimson", linestyle="--", linewidth=1)
            ax.annotate(f"cap ε={s.cap:g}", xy=(1, s.cap), xytext=(2, 3),
                        textcoords="offset points", color="crimson", fontsize=8)
    ax.set_xlabel("ledger entry (one per round the site trained, in order)")
    ax.set_ylabel("cumulative ε (PLD upper bound, replace-one)")
    delta = next((s.delta for s in sites if s.delta is not None), None)
    ax.set_title(f"{run.label}: ε per site over rounds (δ={delta:g})" if delta else run.label,
                 fontsize=10)
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def plot_privacy_utility(runs: list[RunAudit]) -> str | None:
    """Test AUC and accuracy against the largest site ε, one point per run."""
    pts = [r for r in runs if r.final.get("accuracy") is not None]
    if len(pts) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    private = sorted([r for r in pts if r.dp and r.max_epsilon is not None],
                     key=lambda r: r.max_epsilon)
    for metric, marker in (("auc", "o"), ("accuracy", "s")):
        if private:
            ax.plot([r.max_epsilon for r in private], [r.final.get(metric) for r in private],
                    marker=marker, label=f"test {metric} (DP runs)")
            for r in private:
                ax.annotate(r.label, (r.max_epsilon, r.final.get(metric)), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    for j, r in enumerate(r for r in pts if not r.dp):
        for metric, style in (("auc", "-."), ("accuracy", ":")):
            if r.final.get(metric) is not None:
                ax.axhline(r.final[metric], linestyle=style, color=f"C{(j + 2) % 10}",
                           label=f"{r.label} (no DP) {metric}")
    units = sorted({s.unit for r in private for s in r.sites})
    ax.set_xlabel("ε of the most-spent site (PLD upper bound, replace-one; per "
                  f"{' / '.join(units) or 'record'})")
    ax.set_ylabel("test metric")
    ax.set_title("privacy-utility", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


# -- HTML ------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ccc;padding:3px 7px;
font-size:13px;text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
.error{color:#a00;font-weight:600}.warning{color:#a60}.ok{color:#070;font-weight:600}
.box{background:#f7f7fb;border-left:4px solid #558;padding:.6em 1em;margin:1em 0}
.banner{background:#fff3cd;border:2px solid #a60;padding:.6em 1em;margin:1em 0;font-weight:600}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em}
"""


def _hazard_html(h: Hazard) -> str:
    where = f"site {html.escape(str(h.site))}: " if h.site is not None else ""
    return (f'<li class="{h.severity}">[{h.severity.upper()}] <code>{html.escape(h.code)}</code>: '
            f"{where}{html.escape(h.message)}</li>")


def render_html(report: AuditReport) -> str:
    e = html.escape
    hazards = report.all_hazards()
    n_err = sum(h.severity == "error" for h in hazards)
    n_warn = len(hazards) - n_err
    verdict = (f'<p class="error">FAIL: {n_err} error(s), {n_warn} warning(s)</p>' if n_err
               else f'<p class="ok">PASS: no errors ({n_warn} warning(s))</p>')
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fedtransfer privacy audit</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>fedtransfer privacy audit</h1>",
        f"<p>generated {e(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(report.generated_at)))}"
        f" · {e(', '.join(f'{k} {v}' for k, v in report.versions.items()))}</p>",
        verdict,
        *[f"<div class='banner'>{e(line)}</div>" for line in banner_lines(report)],
        f"<div class='box'><b>Unit of privacy.</b> {e(report.unit_of_privacy)}.<br>"
        f"<b>Trust model.</b> {e(report.trust_model)}<br>"
        f"<b>Signatures.</b> {e(report.signatures)}<br>"
        f"<b>Accountants.</b> {e(report.accountants)}</div>",
    ]
    pu = plot_privacy_utility(report.runs)
    if pu:
        parts += ["<h2>Privacy-utility</h2>",
                  f"<img alt='privacy-utility plot' src='data:image/png;base64,{pu}'>"]
    for run in report.runs:
        parts.append(f"<h2>{e(run.label)}</h2><p>{e(run.path)}"
                     + (f" · run {e(run.run_id)} · {e(str(run.mode))} · dp={e(str(run.dp))}"
                        if run.run_id else "")
                     + (f" · test accuracy {_f(run.final['accuracy'])}, AUC {_f(run.final['auc'])}"
                        if run.final.get("accuracy") is not None else "") + "</p>")
        parts += [f"<p class='note'>{e(n)}</p>" for n in run.notes]
        if run.sites:
            rows = [site_row(s) for s in run.sites]
            parts.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in rows[0]) + "</tr>")
            for r in rows:
                parts.append("<tr>" + "".join(
                    f"<td class='{'error' if k == 'chain' and v in _BAD_CHAIN else ''}'>"
                    f"{e(v)}</td>"
                    for k, v in r.items()) + "</tr>")
            parts.append("</table>")
            parts += [f"<p>{e(line)}</p>" for s in run.sites for line in unit_lines(s)]
        img = plot_cumulative(run)
        if img:
            parts.append(f"<img alt='cumulative epsilon, {e(run.label)}' "
                         f"src='data:image/png;base64,{img}'>")
        for s in run.sites:
            if s.released:
                parts.append(f"<details><summary>site {e(s.site)}: what it released to the server"
                             "</summary><table><tr><th>field</th><th>privacy class</th>"
                             "<th>last value</th></tr>")
                parts += [f"<tr><td>{e(r['field'])}</td><td>{e(r['class'])}"
                          f"{e(f' (per {s.unit})') if r['field'] == 'epsilon' else ''}</td>"
                          f"<td>{e(_value(r['value']))}</td></tr>" for r in s.released]
                parts.append("</table></details>")
            if s.cumulative:
                parts.append(f"<details><summary>site {e(s.site)}: spend per round</summary><table>"
                             "<tr><th>entry</th><th>run</th><th>round</th><th>ε replace-one (recomputed, "
                             f"per {e(s.unit)})</th><th>ε stored</th></tr>")
                parts += [f"<tr><td>{p['seq']}</td><td>{e(str(p['run_id']))}</td>"
                          f"<td>{p['round']}</td><td>{_f(p['epsilon'], 4)}</td>"
                          f"<td>{_f(p['epsilon_stored'], 4)}</td></tr>" for p in s.cumulative]
                parts.append("</table></details>")
    if report.empirical:
        parts.append("<h2>Empirical audit (canaries, one training run)</h2>")
        for emp in report.empirical:
            parts.append("<pre>" + e("\n".join(empirical_lines(emp))) + "</pre>")
    parts.append(f"<h2>Hazards ({n_err} error(s), {n_warn} warning(s))</h2><ul>")
    parts += [_hazard_html(h) for h in sorted(hazards, key=lambda h: h.severity != "error")]
    parts.append("</ul><h2>Assumptions</h2><ul>")
    parts += [f"<li>{e(a)}</li>" for a in report.assumptions]
    parts.append("</ul></body></html>")
    return "\n".join(parts)


def write_report(report: AuditReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.html`` and ``audit.json`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "report.html", "json": out / "audit.json"}
    paths["html"].write_text(render_html(report), encoding="utf-8")
    paths["json"].write_text(to_json(report), encoding="utf-8")
    log.debug("audit report: %s", paths["html"])
    return paths
