"""The ``fedtransfer`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cli.models import add_model_commands
from cli.select import add_select_command
from cli.federation import add_federation_commands
from cli.site import add_site_commands
from common.flowerlog import PROJECT_LOGGERS
from common.models.decision import describe_decision
from simulations.scenarios import resolve_config

log = logging.getLogger(__name__)


def _setup_logging(verbose: bool) -> None:
    """Our own loggers at INFO; third-party chatter (Ray, alembic, datasets) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    if verbose:
        logging.getLogger().setLevel(logging.INFO)


def quiet_flower(verbose: bool) -> None:
    """Flower sets its own logger to DEBUG on import and prints through its own
    console handler; keep that handler at WARNING unless ``--verbose``."""
    from flwr.common.logger import update_console_handler

    update_console_handler(level=logging.INFO if verbose else logging.WARNING)
    logging.getLogger("flwr").propagate = False  # it has its own console handler


def _times(ratio: float, better: str, worse: str) -> str:
    """``36x fewer`` for a ratio above 1, ``145x more`` below it (teacher / student)."""
    if ratio >= 1:
        return f"{ratio:.1f}x {better}" if ratio < 10 else f"{ratio:.0f}x {better}"
    if ratio <= 0:
        return worse
    inv = 1 / ratio
    return f"{inv:.1f}x {worse}" if inv < 10 else f"{inv:.0f}x {worse}"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def print_summary(s: dict) -> None:
    f = s["final"]
    lines = [
        "",
        f"== fedtransfer run {s['run_id']} ({s['mode']}, dp={s['dp']}) ==",
        f"dataset {s['dataset']} | backbone {s['backbone']} | head {s['head']} | sites {s['num_sites']}",
        f"test: accuracy {_fmt(f['accuracy'])}  AUC {_fmt(f['auc'])}  "
        f"balanced accuracy {_fmt(f['balanced_accuracy'])}",
    ]
    if sel := s.get("backbone_selection"):  # common/models/transfer.py
        lines.insert(3, f"backbone chosen by {sel['score']} on {sel['data']['records']} public "
                     f"{sel['data']['split']} records (no ε): {sel['chosen']} over "
                     f"{len(sel['candidates']) - 1} others")
    if "decision" in f:
        val = f["decision"].get("val") or {}
        rule = describe_decision(f["decision"], s.get("classes"))
        lines.append(f"  decision rule (shipped): {rule}, chosen on public val (val bal "
                     f"{_fmt(val.get('balanced_accuracy'))}; no ε); argmax: accuracy "
                     f"{_fmt(f['argmax']['accuracy'])}  balanced accuracy "
                     f"{_fmt(f['argmax']['balanced_accuracy'])}")
    if (s.get("class_weights") or {}).get("weights"):
        lines.append("  class-weighted loss: " + ", ".join(
            f"{c} {w:.2f}" for c, w in zip(s["classes"], s["class_weights"]["weights"], strict=True))
            + " (from public val counts)")
    if "secure_aggregation" in s:
        lines.append("aggregation: weighted FedAvg under SecAgg+ (the server saw only the masked sum)")
    p = s["privacy"]
    if p["dp"]:
        lines.append(f"privacy: ε per site ({p['accountant'].upper()} upper bound, "
                     f"{p.get('neighbours', 'add-remove')} neighbours, δ={p['target_delta']:g}, "
                     f"cap ε={p['target_epsilon']:g}); unit: {p['unit']}")
    else:
        lines.append("privacy: none (non-private baseline)")
    lines.append(f"{'site':>6} {'records':>8} {'rounds':>6} {'σ':>7} {'q':>7} {'ε':>7}  status")
    for sid, site in s["sites"].items():
        hist = site.get("history") or []
        sigma = hist[-1]["noise_multiplier"] if hist else None
        q = hist[-1]["sample_rate"] if hist else None
        lines.append(f"{sid:>6} {site.get('num_examples', 0):>8} {len(hist):>6} {_fmt(sigma):>7} "
                     f"{_fmt(q):>7} {_fmt(site.get('epsilon')):>7}  {site.get('status', '')}")
    idle = [(sid, site) for sid, site in s["sites"].items()
            if not [h for h in site.get("history") or [] if h.get("round", 1) >= 1]]
    # issue 24: name a hospital as the per-site metrics name it (site id i is the i-th name)
    names = list(((s["final"].get("test_sites") or {}).get("sites") or {}))
    for sid, site in idle:  # a site whose records never reached the model must not pass unseen
        who = f"site {sid}" + (f" ({names[int(sid)]})" if int(sid) < len(names) else "")
        lines.append(f"WARNING: {who} never trained ({site.get('status')}: "
                     f"{site.get('reason') or 'no reply'}); the results exclude its records")
    if "student" in s:
        t, st, d = s["teacher"], s["student"], s["distillation"]
        rule = (f" ({describe_decision(st['decision'], s.get('classes'))}, its own, on public val)"
                if "decision" in st else "")
        lines.append(f"distilled student {st['architecture']}: test AUC {_fmt(st['auc'])} acc "
                     f"{_fmt(st['accuracy'])} bal {_fmt(st['balanced_accuracy'])}{rule} | teacher "
                     f"({t['kind']}) AUC {_fmt(t['auc'])} acc {_fmt(t['accuracy'])} bal "
                     f"{_fmt(t['balanced_accuracy'])}")
        lines.append(f"  params {st['params']:,} vs {t['params']:,} "
                     f"({_times(d['params_ratio'], 'fewer', 'more')}); "
                     f"CPU {st['cpu_ms_per_image']:.3f} vs {t['cpu_ms_per_image']:.3f} ms/image "
                     f"({_times(d['cpu_speedup'], 'faster', 'slower')}); {d['seconds']:.1f} s; "
                     "no ε (public data)")
        if d["params_ratio"] < 1:
            lines.append(f"  note: the student is larger than the teacher (backbone "
                         f"{t.get('backbone')}): the head is the compact model here; "
                         "distill = false skips the student")
    elif (s.get("distillation") or {}).get("status") in ("failed", "skipped"):
        lines.append(f"distillation {s['distillation']['status']}: {s['distillation']['reason']}")
    if "server_copy" in s.get("delivery", {}):
        sites = s["delivery"]["sites"]
        ok = sum(v.get("status") == "saved" for v in sites.values())
        lines.append(f"delivered to {ok}/{len(sites)} sites (server copy: "
                     f"{s['delivery']['server_copy']})")
    if s.get("stop_reason") and s["stop_reason"] != "completed":
        lines.append(f"note: {s['stop_reason']}")
    t = s.get("timing", {})
    if "total_seconds" in t:
        lines.append(f"wall time {t['total_seconds']:.1f} s")
    print("\n".join(lines))


def cmd_simulate(args) -> int:
    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from simulations.simulate import simulate

    cfg = resolve_config(args.config, args.set, args.out)
    quiet_flower(args.verbose)
    summary = simulate(cfg, ray_address=args.ray_address)
    print_summary(summary)
    print(f"results: {summary['run_dir']}")
    return 0


def cmd_compare(args) -> int:
    """The privacy-utility comparison: DP federated, non-DP federated, centralized."""
    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from common.privacy.accounting import (
        NEIGHBOURS,
        REPORTED_ACCOUNTANT,
        UNIT_OF_PRIVACY,
    )

    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from simulations.simulate import simulate

    base = resolve_config(args.config, args.set, None)
    quiet_flower(args.verbose)
    root = Path(args.out or "runs/compare")
    arms = [("federated-dp", base.replace(mode="federated", dp=True)),
            ("federated-nodp", base.replace(mode="federated", dp=False)),
            ("centralized-nodp", base.replace(mode="centralized", dp=False))]
    rows = []
    for name, cfg in arms:
        log.info("== %s ==", name)
        s = simulate(cfg.replace(out_dir=str(root / name), ledger_dir=""),
                     ray_address=args.ray_address)
        eps = max((v["epsilon"] for v in s["sites"].values() if v.get("epsilon") is not None),
                  default=None)
        sites = s["final"].get("test_sites", {}).get("mean_over_sites", {})
        rows.append({"arm": name, "epsilon_max_site": eps, "delta": base.target_delta if cfg.dp else None,
                     **{k: s["final"][k] for k in ("accuracy", "auc", "balanced_accuracy")},
                     "site_mean_accuracy": sites.get("accuracy"), "site_mean_auc": sites.get("auc")})
    root.mkdir(parents=True, exist_ok=True)
    (root / "compare.json").write_text(json.dumps({"unit_of_privacy": "one training record at one site",
                                                   "rows": rows}, indent=2))
    per_site = any(r["site_mean_accuracy"] is not None for r in rows)
    print(f"\n{'arm':<18} {'ε (max site)':>12} {'accuracy':>9} {'AUC':>7} {'bal.acc':>8}"
          + (f" {'site-mean acc':>13} {'site-mean AUC':>13}" if per_site else ""))
    for r in rows:
        print(f"{r['arm']:<18} {_fmt(r['epsilon_max_site']):>12} {_fmt(r['accuracy']):>9} "
              f"{_fmt(r['auc']):>7} {_fmt(r['balanced_accuracy']):>8}"
              + (f" {_fmt(r['site_mean_accuracy']):>13} {_fmt(r['site_mean_auc']):>13}"
                 if per_site else ""))
    print(f"ε: {REPORTED_ACCOUNTANT.upper()} upper bound per site, {NEIGHBOURS} neighbours, at "
          f"δ={base.target_delta:g}; unit: {UNIT_OF_PRIVACY}")
    if per_site:
        print("site-mean: the unweighted mean over sites of each site's own test split")
    print(f"results: {root / 'compare.json'}")
    return 0


def default_audit_out(paths: list[str]) -> Path:
    """``<run>/audit`` for a single run directory, else ``./audit``."""
    if len(paths) == 1 and (Path(paths[0]) / "summary.json").is_file():
        return Path(paths[0]) / "audit"
    return Path("audit")


def cmd_audit(args) -> int:
    """Recompute every site's ε from its ledger and flag hazards.

    Exit status 1 when any hazard of severity "error" is found.
    """
    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from common.audit.checks import Trust

    # lazy, as above
    from common.audit.recompute import audit

    # lazy, as above
    from common.audit.report import format_text, to_json, write_report

    if args.json:  # stdout carries only the JSON document; logs go to stderr
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)
    trust = Trust(public_keys=tuple(Path(p) for p in args.public_keys),
                  seals=tuple(Path(p) for p in args.seal),
                  legacy_keys=tuple(Path(p) for p in args.legacy_key),
                  accept_unverified=args.accept_unverified,
                  accept_unanchored=args.accept_unanchored)
    report = audit(args.paths, trust=trust, empirical=args.empirical, site=args.site,
                   canaries=args.canaries, seed=args.seed)
    paths = write_report(report, args.out or default_audit_out(args.paths))
    if args.json:
        print(to_json(report))
    else:
        print(format_text(report))
        print(f"report: {paths['html']}  json: {paths['json']}")
    return 1 if report.has_errors else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtransfer", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="show Flower's own logs")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (
        ("simulate", cmd_simulate, "run one scenario (Flower simulation or centralized)"),
        ("compare", cmd_compare, "privacy-utility comparison: DP vs non-DP federated vs centralized"),
    ):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--config", help="a scenario name in simulations/configs/ or a TOML path")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
        sp.add_argument("--out", help="run directory")
        sp.add_argument("--ray-address", metavar="ADDRESS",
                        help="run the sites on this existing Ray cluster (default: RAY_ADDRESS, "
                             "else a fresh local Ray instance); ledger-dir and cache-dir must be "
                             "storage every node sees (docs/ray-cluster.md)")
        sp.set_defaults(func=fn)
    sp = sub.add_parser("audit", help="recompute ε from site ledgers, verify their signatures, "
                        "flag hazards, write a report (exit 1 on any error-level hazard, including "
                        "whatever it cannot verify)")
    sp.add_argument("paths", nargs="+", metavar="PATH",
                    help="a run directory, a ledger (.sqlite, or a ledger.json export), or a "
                         "folder searched recursively")
    sp.add_argument("--public-keys", action="append", default=[], metavar="DIR",
                    help="a folder of the sites' registered public keys, "
                         "DIR/site-<id>/ledger.pub or ledger.key.pub (repeatable); they come "
                         "before the run directory's sites/site-<id>/ledger.pub")
    sp.add_argument("--seal", action="append", default=[], metavar="FILE",
                    help="a seal from 'fedtransfer site seal' to check a ledger against "
                         "(repeatable): rows up to it count as anchored")
    sp.add_argument("--legacy-key", action="append", default=[], metavar="FILE",
                    help="an older ledger's HMAC secret, to check its hmac-sha256 entries "
                         "(repeatable); they stay unverified: the key also forges them")
    sp.add_argument("--accept-unverified", action="store_true",
                    help="accept what no registered public key verifies (no key, unsigned "
                         "anchors, legacy entries) as warnings; the report's banner says so")
    sp.add_argument("--accept-unanchored", action="store_true",
                    help="accept entries newer than every anchor and seal held as warnings; "
                         "the report's banner says so")
    sp.add_argument("--json", action="store_true", help="print machine-readable JSON")
    sp.add_argument("--out", help="where report.html and audit.json go "
                    "(default: <run>/audit for one run directory, else ./audit)")
    sp.add_argument("--empirical", action="store_true",
                    help="also run the one-run canary audit (Steinke, Nasr & Jagielski 2023) on one "
                         "site of each federated DP run, with a non-private control")
    sp.add_argument("--site", help="site id for --empirical (default: the first that trained)")
    sp.add_argument("--canaries", type=int, default=1000, help="canaries for --empirical")
    sp.add_argument("--seed", type=int, default=0, help="seed for --empirical")
    sp.set_defaults(func=cmd_audit)

    add_model_commands(sub)

    add_site_commands(sub)
    add_federation_commands(sub)
    add_select_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"fedtransfer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
