-- A ledger written by common/privacy/ledger.py of main 4b1b526 (before signed ledgers):
-- the HMAC-SHA256 chain under the key bytes(range(32)), three rounds, cap 8, keyed seal.
-- Made by tests/common/data/make_legacy_ledgers.py; sqlite3 <file> .dump
PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES('schema_version','1');
INSERT INTO meta VALUES('seal','1ea13940a1923ca1fd57b0c5f77324ae1fdded8a3109c705cb98429d8b714f46');
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    created_at REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    clip_norm REAL NOT NULL,
    delta REAL NOT NULL,
    sampler TEXT NOT NULL,
    secure_rng INTEGER NOT NULL,
    accountant TEXT NOT NULL,
    accountant_version TEXT NOT NULL,
    libraries TEXT NOT NULL,
    dataset_size INTEGER NOT NULL,
    data_fingerprint TEXT NOT NULL,
    epsilon_after REAL NOT NULL,
    trained TEXT NOT NULL DEFAULT '',
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE
);
INSERT INTO entries VALUES(1,'legacy-run',1,1700000000.0,1.1999999999999999555,0.2000000000000000111,5,1.0,1.0000000000000000817e-05,'poisson',0,'pld/replace-one','dp-accounting-0.6.0','{"opacus": "1.6.0"}',80,'ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff',3.6222029320095230353,'','0000000000000000000000000000000000000000000000000000000000000000','hmac-sha256:e8bc8322b4ebada2a2c77f2743acbefb0d45f9090692744d8f39fdeccf068d6c');
INSERT INTO entries VALUES(2,'legacy-run',2,1700000100.0,1.1999999999999999555,0.2000000000000000111,5,1.0,1.0000000000000000817e-05,'poisson',0,'pld/replace-one','dp-accounting-0.6.0','{"opacus": "1.6.0"}',80,'ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff',5.0163132787364173026,'','hmac-sha256:e8bc8322b4ebada2a2c77f2743acbefb0d45f9090692744d8f39fdeccf068d6c','hmac-sha256:e4efd276b15e6772e88d27f564ebab26d11e68b91d9e404c8071ad8cec739d7a');
INSERT INTO entries VALUES(3,'legacy-run',3,1700000200.0,1.1999999999999999555,0.2000000000000000111,5,1.0,1.0000000000000000817e-05,'poisson',0,'pld/replace-one','dp-accounting-0.6.0','{"opacus": "1.6.0"}',80,'ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff',6.1679640607511316829,'','hmac-sha256:e4efd276b15e6772e88d27f564ebab26d11e68b91d9e404c8071ad8cec739d7a','hmac-sha256:5ffbc146df93a8e0dad4fa3688c69e2f045db2ad8b99fd015fa229fea0d98980');
CREATE TABLE caps (
    seq INTEGER PRIMARY KEY,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    created_at REAL NOT NULL,
    reason TEXT NOT NULL
);
INSERT INTO caps VALUES(1,8.0,1.0000000000000000817e-05,1796672515.2419199943,'first use');
CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: UPDATE refused'); END;
CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: DELETE refused'); END;
CREATE TRIGGER caps_no_update BEFORE UPDATE ON caps
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: UPDATE refused'); END;
CREATE TRIGGER caps_no_delete BEFORE DELETE ON caps
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: DELETE refused'); END;
COMMIT;
