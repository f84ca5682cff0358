"""Where a deployed round waits: a timeline of one loopback federation.

``python -m benchmarks.supernode_wait --out DIR [--rounds 5]`` runs the
deployment arm of ``benchmarks/deployment.py`` (TLS SuperLink, SuperNode
authentication, three SuperNodes on their own ``.npz``, ``flwr run``) and
watches it every 20 ms:

* the server's checkpoint (``<run>/checkpoint/state.json``), written the moment
  a round is aggregated and evaluated, just before the next round's messages
  are pushed: the server's clock;
* each SuperNode's log: ``Receiving: train message`` (it pulled the message)
  and ``Sending: train message`` (its ClientApp process is done and the reply
  goes out).

Per site and round (after round 1) it splits the round into *idle* (from the
server's checkpoint of round r-1 to the site pulling round r: Flower's
SuperNode sleeps a fixed 3 s whenever a pull finds no message,
``flwr/supernode/start_client_internal.py``), *ClientApp* (pull to reply: the
fresh ``flwr-clientapp`` process, with the site's work inside), and the rest
(reply transport, the server's pull and aggregation). It writes
``DIR/supernode_wait.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.deployment import RUN
from benchmarks.machine import machine_info
from simulations.loopback import Loopback

log = logging.getLogger(__name__)

RECEIVE, SEND = "Receiving: train message", "Sending: train message"


def timeline(work: Path, rounds: int, num_sites: int = 3, *, sites: str = "serve",
             serve_args: tuple[str, ...] = ()) -> dict:
    """Run the federation and return the event times (seconds since the run started).
    ``sites``/``serve_args``: how the sites join (``simulations/loopback.py``)."""

    out = work / "run"
    config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
                      for k, v in {**RUN, "num-sites": num_sites, "min-sites": num_sites}.items())
    config += f" num-rounds={rounds} out-dir='{out}' cache-dir='{work / 'cache'}'"
    config = config.replace('"', "'")
    events: dict = {"checkpoint": {}, "receive": {s: [] for s in range(num_sites)},
                    "send": {s: [] for s in range(num_sites)}}
    state = out / "checkpoint" / "state.json"
    with Loopback(work / "loopback", num_sites=num_sites, sites=sites,
                  serve_args=serve_args) as fed:
        fed.start_federation()
        proc = fed.run(config)
        t0 = time.monotonic()
        mtime = None
        while True:
            now = time.monotonic() - t0
            for s in range(num_sites):
                text = fed.log(f"supernode-{s}")
                for key, needle in (("receive", RECEIVE), ("send", SEND)):
                    while text.count(needle) > len(events[key][s]):
                        events[key][s].append(now)
            try:
                m = state.stat().st_mtime_ns
                if m != mtime:
                    r = int(json.loads(state.read_text())["round"])
                    events["checkpoint"].setdefault(r, now)
                    mtime = m
            except (OSError, ValueError, KeyError):
                pass
            if proc.poll() is not None:
                break
            if now > 1800:
                raise TimeoutError("the deployed run did not finish within 30 min")
            time.sleep(0.02)
        if proc.returncode != 0:
            raise RuntimeError(f"flwr run exited {proc.returncode}: {fed.log('flwr-run')[-2000:]}")
    return events


def split(events: dict, rounds: int) -> dict:
    """Per round r >= 2: idle, ClientApp and rest seconds per site, and the round."""
    ck = events["checkpoint"]
    rows = []
    for r in range(2, rounds + 1):
        if r not in ck or r - 1 not in ck:
            continue
        sites = {}
        for s in events["receive"]:
            rec, snd = events["receive"][s], events["send"][s]
            if len(rec) < r or len(snd) < r:
                continue
            sites[s] = {"idle": rec[r - 1] - ck[r - 1], "clientapp": snd[r - 1] - rec[r - 1],
                        "after_reply": ck[r] - snd[r - 1]}
        rows.append({"round": r, "round_seconds": ck[r] - ck[r - 1], "sites": sites})
    every = [v for row in rows for v in row["sites"].values()]
    slowest_idle = [max(v["idle"] for v in row["sites"].values()) for row in rows if row["sites"]]
    return {"rows": rows,
            "mean": {k: statistics.mean(v[k] for v in every) for k in
                     ("idle", "clientapp", "after_reply")} if every else {},
            "round_seconds_mean": statistics.mean(r["round_seconds"] for r in rows) if rows else None,
            "idle_max": max((v["idle"] for v in every), default=None),
            "slowest_site_idle_mean": statistics.mean(slowest_idle) if slowest_idle else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--stock", action="store_true", help="sites on Flower's own flower-supernode "
                   "(default: fedtransfer site serve, the warm launcher)")
    p.add_argument("--idle-poll", type=float, help="site serve --idle-poll SECONDS")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    a.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    events = timeline(a.out.resolve(), a.rounds, sites="flower" if a.stock else "serve",
                      serve_args=("--idle-poll", str(a.idle_poll)) if a.idle_poll else ())
    res = {"date": dt.date.today().isoformat(), "machine": machine_info(),
           "sites": "stock flower-supernode" if a.stock else "fedtransfer site serve",
           "idle_poll": a.idle_poll,
           "load_average": {"before": load_before, "after": os.getloadavg()},
           "rounds": a.rounds, "events": events, **split(events, a.rounds)}
    (a.out / "supernode_wait.json").write_text(json.dumps(res, indent=1))
    print(f"{'round':>5} {'site':>4} {'idle s':>7} {'ClientApp s':>11} {'after reply s':>13}")
    for row in res["rows"]:
        for s, v in row["sites"].items():
            print(f"{row['round']:>5} {s:>4} {v['idle']:>7.2f} {v['clientapp']:>11.2f} "
                  f"{v['after_reply']:>13.2f}")
        print(f"{row['round']:>5} {'all':>4} round {row['round_seconds']:.2f} s")
    m = res["mean"]
    if m:
        print(f"mean per site: idle {m['idle']:.2f} s (max {res['idle_max']:.2f}), ClientApp "
              f"{m['clientapp']:.2f} s, after reply {m['after_reply']:.2f} s; round "
              f"{res['round_seconds_mean']:.2f} s; slowest site's idle per round "
              f"{res['slowest_site_idle_mean']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
