"""``fedtransfer site check`` and ``fedtransfer deploy certs``: a site operator's
and a coordinator's commands for a real deployment (see docs/deployment.md, "Deploying on
edge sites")."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _plan(plan_cls, args, run, **site):
    """The run ``site check`` plans for: ``--rounds`` / ``--epochs`` / ``--batch-size``,
    else the run's (the federation file's, or the defaults); σ as requested; the rest
    (cap, δ, holdout, σ floor, unit) the site's own."""
    return plan_cls(num_rounds=args.rounds or run.num_rounds,
                    local_epochs=args.epochs or run.local_epochs,
                    batch_size=args.batch_size or run.batch_size,
                    noise_multiplier=args.noise_multiplier, **site)


def cmd_site_check(args) -> int:
    """Exit 0 when the data is ready to join, 1 when it is not.

    With ``--node-config`` / ``--policy-file`` (the site's own settings, exactly as its
    SuperNode gets them) this is the site's admission: its data is read as it declares,
    the outcome (and the public count) is stored beside its ledger, and a site that
    was out of the federation is back in once its data reads as declared.
    """
    if args.node_config or args.policy_file:
        return _admit(args)
    if not args.data:
        print("error: give --data (a first look), or the site's --node-config / --policy-file")
        return 2
    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from common.config import RunConfig
    # lazy: as above
    from common.data.sitecheck import Plan, check_site, format_report

    run = RunConfig()  # the run's defaults: what a site joins unless told otherwise
    plan = _plan(Plan, args, run, target_epsilon=args.cap, target_delta=args.delta,
                 holdout=args.holdout, min_noise_multiplier=args.min_noise_multiplier,
                 unit=args.privacy_unit, group_size=args.max_records_per_patient or 1)
    classes = tuple(c.strip() for c in args.class_names.split(",")) if args.class_names else None
    schema = None
    if args.schema:
        # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
        from common.data.schema import SchemaError, load_schema

        try:
            schema = load_schema(args.schema)
        except SchemaError as exc:
            print(f"error: --schema: {exc}")
            return 2
    report = check_site(args.data, plan, ledger=args.ledger, num_classes=args.num_classes,
                        schema=schema,
                        classes=classes)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json
          else format_report(report))
    return 0 if report.ok else 1


def _admit(args) -> int:
    """``site check`` on the site's own settings: read, check, store the admission."""
    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from flwr.common.config import parse_config_args

    # lazy: as above
    from client.admission import ADMISSION_FILE, admit
    # lazy: as above
    from client.settings import SiteConfigError, deployed_policy
    # lazy: as above
    from common.config import RunConfig
    # lazy: as above
    from common.data.sitecheck import Plan, check_site, format_report

    node = parse_config_args([args.node_config]) if args.node_config else {}
    if args.policy_file:
        node["policy-file"] = args.policy_file
    try:
        settings = deployed_policy(node)
    except SiteConfigError as exc:
        print(f"error: {exc}")
        return 2
    schema = settings.declaration.schema
    run = settings.federation.config if settings.federation is not None else RunConfig()
    plan = _plan(Plan, args, run, target_epsilon=settings.target_epsilon,
                 target_delta=settings.target_delta, holdout=settings.holdout,
                 min_noise_multiplier=settings.min_noise_multiplier,
                 unit=settings.privacy_unit, group_size=settings.group_size)
    ledger = settings.ledger_path if settings.ledger_path.is_file() else None
    report = check_site(settings.data_path, plan, ledger=ledger,
                        classes=schema.classes, schema=schema)
    adm = admit(settings)
    if not adm.admitted:
        report.errors.append(adm.reason)
    elif report.estimate is not None and report.estimate.train_records != adm.num_train:
        # lazy: as above
        from common.data.sitecheck import estimate_epsilon
        # lazy: as above
        from common.privacy.ledger import Ledger

        # The admitted count (its holdout split by patient where ids are declared) is the
        # one the site releases and plans with.
        prior = Ledger(ledger, settings.ledger_key).history() if ledger is not None else []
        report.estimate = estimate_epsilon(adm.num_train, plan, prior)
    print(json.dumps({**report.to_dict(), "admission": adm.__dict__}, indent=2, default=str)
          if args.json else format_report(report))
    if adm.admitted:
        records = (f" ({adm.num_train_records} training records, not released)"
                   if settings.privacy_unit != "record" else "")
        print(f"admitted: {adm.num_train} training {settings.privacy_unit}s{records} (released "
              f"as the site's public count), {adm.num_holdout} held out; declaration "
              f"{settings.declaration.sha256[:16]}; recorded in "
              f"{settings.state_dir / ADMISSION_FILE}")
    else:
        print("NOT ADMITTED: the site answers every message with 'site-unavailable' until "
              "this check passes")
    return 0 if report.ok and adm.admitted else 1


def cmd_raise_cap(args) -> int:
    """Record a new cap in the site's ledger: an explicit, logged operator action."""
    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from common.privacy.ledger import Ledger

    ledger = Ledger(args.ledger)
    old = ledger.cap()
    if old is not None and args.epsilon < old[0] and args.delta == old[1]:
        print(f"the node config can lower the cap by itself (ε {old[0]:g} is in force); "
              "nothing recorded")
        return 1
    ledger.record_cap(epsilon=args.epsilon, delta=args.delta, reason=args.reason)
    print(f"{args.ledger}: cap ε={args.epsilon:g} δ={args.delta:g} recorded (was "
          f"{'none' if old is None else f'ε={old[0]:g} δ={old[1]:g}'}); reason: {args.reason}. "
          "Set the same target-epsilon / target-delta in the node config; the audit lists "
          "every raise.")
    return 0


def cmd_site_seal(args) -> int:
    """Write a fresh signed seal of the site's ledger, for an auditor's --seal."""
    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from common.privacy.ledger import Ledger

    if not Path(args.ledger).is_file():
        raise FileNotFoundError(f"no ledger at {args.ledger} (the node config's ledger-path)")
    sealed = Ledger(args.ledger, args.key).seal()
    text = json.dumps(sealed.to_dict(), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"{args.out}: ledger {sealed.ledger_id} sealed at {sealed.count} entries, head "
              f"{sealed.head[:23]}…, signed by {sealed.key_id[:31]}…; give it to the auditor "
              "(fedtransfer audit ... --seal FILE)")
    else:
        print(text)
    return 0


def cmd_site_export(args) -> int:
    """Write a dataset as hospital folders (<out>/<site>/<class>/*.png)."""
    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from common.data.datasets import export_site_folders, load_dataset

    splits = load_dataset(args.dataset, args.data_dir, args.seed)
    if splits.columns:
        print(f"error: {args.dataset} holds tabular records; export writes images")
        return 2
    include = tuple(p.strip() for p in args.splits.split(",") if p.strip())
    counts = export_site_folders(splits, args.out, num_sites=args.sites, alpha=args.alpha,
                                 seed=args.seed, include=include)
    if counts.left_out:
        print(f"left out {counts.left_out} record(s) of the {', '.join(include)} split(s) "
              "identical to a public (val) or test record: a site may not hold them")
    for site, per_class in counts.items():
        print(f"{site}: " + ", ".join(f"{c} {n}" for c, n in per_class.items()))
    print(f"wrote {sum(sum(v.values()) for v in counts.values())} images of the "
          f"{', '.join(include)} split(s) to {args.out}: each site-<i> folder is one hospital's "
          f"(node config data-path=\"imagefolder:{args.out}/site-<i>\"), or simulate them all "
          f"with dataset = \"imagefolder:{args.out}?site=folder\", partitioner = \"site\", "
          f"num-sites = {args.sites}")
    if include != ("train",):
        print("warning: the val and test splits are the coordinator's public and test records; "
              "a site holding them is refused at its check (fedtransfer federation init "
              "publishes their hashes)")
    return 0


def cmd_deploy_certs(args) -> int:
    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from common.certs import make_deployment_keys

    made = make_deployment_keys(args.out, sites=args.sites, hosts=args.host,
                                days=args.days, overwrite=args.force)
    for kind, path in made.items():
        print(f"{kind:<28} {path}")
    return 0


def cmd_site_serve(args) -> int:
    """Join the federation: the SuperNode with the warm launcher, until SIGTERM/SIGINT
    (exit 0) or until the SuperNode exits (its status)."""
    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from client.serve import PRELOAD, ServeOptions, serve

    node_config = args.node_config
    site_dir = args.dir or (str(Path(node_config).parent) if node_config.endswith(".toml")
                            else None)
    if site_dir is None:
        print("error: --dir: the site's folder (FLWR_HOME, the shim and serve.json go "
              "there) is needed when --node-config is not a .toml file")
        return 2
    problem = _admit_before_joining(node_config)
    if problem:
        print(f"error: this site does not join: {problem}")
        return 2
    extra = tuple(m.strip() for m in (args.preload or "").split(",") if m.strip())
    try:
        opts = ServeOptions(superlink=args.superlink, node_config=node_config,
                            site_dir=Path(site_dir), root_certificates=args.root_certificates,
                            auth_key=args.auth_key, insecure=args.insecure, port=args.port,
                            health_port=args.health_port, warm=not args.cold,
                            idle_poll=args.idle_poll, max_retries=args.max_retries,
                            max_wait_time=args.max_wait_time, preload=PRELOAD + extra)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    return serve(opts)


def _admit_before_joining(node_config: str) -> str:
    """The site's own check before it joins (its policy, declaration and data, and the
    public-record check): the reason it cannot join, told here only, or ``""``."""
    # lazy: a command imports only what it runs
    from flwr.common.config import parse_config_args

    # lazy: as above
    from client.admission import SiteUnavailable, require
    # lazy: as above
    from client.settings import SiteConfigError, deployed_policy

    try:
        settings = deployed_policy(parse_config_args([node_config]))
        adm = require(settings)
    except (SiteConfigError, ValueError, OSError) as exc:
        return str(exc)
    except SiteUnavailable as exc:
        return (f"its data is not admitted ({exc}); fix it, then run `fedtransfer site check "
                f"--node-config ...`")
    print(f"fedtransfer site serve: admitted {adm.num_train} training records "
          f"(fixed at {time.strftime('%Y-%m-%d %H:%M', time.localtime(adm.checked_at))})")
    return ""


def _add_serve_parser(site) -> None:
    v = site.add_parser("serve", help="join the federation: start this site's SuperNode "
                        "(TLS, authentication, node config) with a warm ClientApp launcher")
    v.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, host:port")
    v.add_argument("--node-config", required=True,
                   help="the site's node config: a .toml file, or 'key=value ...' as "
                        "flower-supernode takes it (then written to <dir>/node-config.toml)")
    v.add_argument("--dir", help="the site's folder: FLWR_HOME, the shim and serve.json "
                   "(default: the node config file's folder)")
    v.add_argument("--root-certificates", type=Path, help="the federation's CA certificate "
                   "(TLS; without it, the system's CAs)")
    v.add_argument("--auth-key", type=Path, help="this site's SuperNode private key "
                   "(authentication; the coordinator registered its public key)")
    v.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    v.add_argument("--port", type=int, help="the SuperNode's ClientAppIo API port on "
                   "127.0.0.1 (default: a free one)")
    v.add_argument("--health-port", type=int, help="the SuperNode's health server port on "
                   "127.0.0.1 (default: a free one)")
    v.add_argument("--cold", action="store_true", help="no warm launcher: Flower's own "
                   "flwr-clientapp process per message")
    v.add_argument("--idle-poll", type=float, metavar="SECONDS",
                   help="cap the SuperNode's 3 s idle sleep (flwr 1.41.0 only; costs one "
                        "pull per SECONDS per idle site at the SuperLink; default: off)")
    v.add_argument("--preload", help="more third-party modules for the warm launcher to "
                   "import, comma-separated (never the app's own)")
    v.add_argument("--max-retries", type=int, help="reconnection tries (default: no limit)")
    v.add_argument("--max-wait-time", type=float, help="seconds to keep reconnecting "
                   "(default: no limit)")
    v.set_defaults(func=cmd_site_serve)


def add_site_commands(sub) -> None:
    sp = sub.add_parser("site", help="a site operator's commands")
    site = sp.add_subparsers(dest="site_command", required=True)
    c = site.add_parser("check", help="validate the site's data and estimate ε for the planned "
                        "run (exit 1 when not ready)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--node-config", help="the site's own node config, as its SuperNode gets "
                   "it ('data-path=\"...\" ledger-path=\"...\" ...'): check the data as the "
                   "site declares it and admit it (what the site releases as its count)")
    c.add_argument("--policy-file", help="the site's policy file (as node config policy-file)")
    c.add_argument("--data", help="imagefolder:<dir>, dicom:<dir>, csv:<file>[?label="
                   "COL&missing=error|drop|zero&site=COL&patient=column:COL], medmnist:<file.npz>, "
                   "or a bare directory / .csv / .npz path (the node config's data-path; "
                   "docs/data.md)")
    c.add_argument("--cap", type=float, default=4.0, help="the site's ε cap (target-epsilon)")
    c.add_argument("--delta", type=float, default=1e-5, help="the site's δ (target-delta)")
    c.add_argument("--rounds", type=int, help="planned rounds (default: the federation file's "
                   "num-rounds, else the run config's default)")
    c.add_argument("--epochs", type=int, help="local epochs per round (default: as --rounds)")
    c.add_argument("--batch-size", type=int, help="requested batch (default: as --rounds)")
    c.add_argument("--noise-multiplier", type=float, default=0.0,
                   help="σ the server will request (0: the site calibrates to its cap)")
    c.add_argument("--holdout", type=float, default=0.2, help="the site's holdout fraction")
    c.add_argument("--min-noise-multiplier", type=float, default=0.3,
                   help="the site's σ floor (node config min-noise-multiplier): the σ the site "
                        "runs is never below it, and the estimate uses the same")
    c.add_argument("--ledger", help="the site's ledger: its earlier spend counts")
    c.add_argument("--privacy-unit", choices=("record", "patient"), default="record",
                   help="the site's unit of privacy (node config privacy-unit): 'patient' "
                        "plans over patients (the data spec must declare ?patient=...)")
    c.add_argument("--max-records-per-patient", type=int, default=0,
                   help="the site's declared k (node config max-records-per-patient); with "
                        "the record unit, the group-privacy ε per patient is shown beside")
    c.add_argument("--num-classes", type=int, help="the federation's class count")
    c.add_argument("--class-names", help="the federation's class names in order, comma-separated "
                   "(the node config's class-names)")
    x = site.add_parser("export", help="write a dataset as hospital folders "
                            "(<out>/<site>/<class>/*.png), Dirichlet label skew")
    x.add_argument("--dataset", required=True, help="e.g. medmnist:pneumoniamnist")
    x.add_argument("--data-dir", default="", help="where the dataset's files are")
    x.add_argument("--out", required=True, help="a new folder")
    x.add_argument("--sites", type=int, default=4)
    x.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--splits", default="train", help="comma-separated splits to write (the "
                   "source's val and test are the coordinator's public records)")
    x.set_defaults(func=cmd_site_export)
    c.add_argument("--schema", help="the federation's schema (a .toml with a [schema] table, "
                   "or .json): classes, and a CSV's columns by name")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=cmd_site_check)
    r = site.add_parser("raise-cap", help="record a new ε cap (or δ) in the site's ledger: the "
                        "only way to raise it; the audit lists every raise with its reason")
    r.add_argument("--ledger", required=True, help="the site's ledger (node config ledger-path)")
    r.add_argument("--epsilon", type=float, required=True, help="the new cap")
    r.add_argument("--delta", type=float, required=True, help="δ (the same as before, usually)")
    r.add_argument("--reason", required=True, help="why, for the audit")
    r.set_defaults(func=cmd_raise_cap)
    _add_serve_parser(site)

    sl = site.add_parser("seal", help="write a fresh signed seal of the site's ledger (entry "
                         "count, head hash, time, ledger id) for an auditor: fedtransfer audit "
                         "... --seal FILE")
    sl.add_argument("--ledger", required=True, help="the site's ledger (node config ledger-path)")
    sl.add_argument("--key", help="its signing key (node config ledger-key; default "
                    "<ledger>.key)")
    sl.add_argument("--out", help="write the seal here (default: print it)")
    sl.set_defaults(func=cmd_site_seal)

    dp = sub.add_parser("deploy", help="a coordinator's deployment helpers")
    dep = dp.add_subparsers(dest="deploy_command", required=True)
    k = dep.add_parser("certs", help="make a CA, the SuperLink's TLS certificate and, per "
                       "site, a SuperNode authentication key pair and a ledger signing key pair")
    k.add_argument("--out", required=True, help="folder for the keys and certificates")
    k.add_argument("--sites", type=int, default=3, help="SuperNode key pairs to make")
    k.add_argument("--host", action="append", default=None,
                   help="SuperLink host name or IP for the certificate (repeatable; "
                        "default: localhost and 127.0.0.1)")
    k.add_argument("--days", type=int, default=365, help="certificate validity")
    k.add_argument("--force", action="store_true", help="overwrite existing files")
    k.set_defaults(func=cmd_deploy_certs)
