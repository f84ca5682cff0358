"""How the legacy fixtures here were made: with the ledger code of main 4b1b526 (the
HMAC chain), before signed ledgers. To remake them::

    mkdir -p /tmp/legacy && git show 4b1b526:common/privacy/ledger.py > /tmp/legacy/legacy_ledger.py
    PYTHONPATH=. python tests/common/data/make_legacy_ledgers.py /tmp/legacy
    sqlite3 /tmp/legacy/hmac.sqlite .dump      # -> legacy_hmac_ledger.sql (header added)
    sqlite3 /tmp/legacy/unkeyed.sqlite .dump   # -> legacy_unkeyed_ledger.sql
"""
import json, sqlite3, sys, dataclasses
sys.path.insert(0, "/tmp/legacy")
import legacy_ledger as L
from common.privacy.accounting import Mechanism, epsilon, LEDGER_ACCOUNTANT

KEY = bytes(range(32))
out = sys.argv[1]
led = L.Ledger(f"{out}/hmac.sqlite")
led.key_path.write_bytes(KEY)
led.record_cap(epsilon=8.0, delta=1e-5, reason="first use")
hist = []
for r, t in ((1, 1700000000.0), (2, 1700000100.0), (3, 1700000200.0)):
    m = Mechanism(1.2, 0.2, 5)
    hist.append(m)
    led.append(L.Entry(run_id="legacy-run", round=r, noise_multiplier=1.2, sample_rate=0.2, steps=5,
        clip_norm=1.0, delta=1e-5, sampler="poisson", secure_rng=False, accountant=LEDGER_ACCOUNTANT,
        accountant_version="dp-accounting-0.6.0", libraries='{"opacus": "1.6.0"}', dataset_size=80,
        data_fingerprint="f" * 64, epsilon_after=epsilon(hist, delta=1e-5), created_at=t))
assert led.verify_chain() == []
# the oldest format: unkeyed SHA-256, no seal
con = sqlite3.connect(f"{out}/unkeyed.sqlite")
con.executescript(L._SCHEMA.replace("    trained TEXT NOT NULL DEFAULT '',\n", ""))
prev = L.GENESIS
hist = []
for r, t in ((1, 1690000000.0), (2, 1690000100.0)):
    hist.append(Mechanism(1.5, 0.25, 4))
    e = L.Entry(run_id="old-run", round=r, noise_multiplier=1.5, sample_rate=0.25, steps=4,
        clip_norm=1.0, delta=1e-5, sampler="poisson", secure_rng=False, accountant=LEDGER_ACCOUNTANT,
        accountant_version="dp-accounting-0.6.0", libraries="{}", dataset_size=64,
        data_fingerprint="e" * 64, epsilon_after=epsilon(hist, delta=1e-5), created_at=t,
        seq=r, prev_hash=prev)
    e = dataclasses.replace(e, hash=e.content_hash(None))
    cols = [c for c in L._COLUMNS if c != "trained"]
    vals = [getattr(e, c) for c in cols]
    vals[cols.index("secure_rng")] = int(e.secure_rng)
    con.execute(f"INSERT INTO entries ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})", vals)
    prev = e.hash
con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
con.commit(); con.close()
print(L.verify_chain(L.Ledger(f"{out}/unkeyed.sqlite").entries()))
