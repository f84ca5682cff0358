-- A ledger written by common/privacy/ledger.py of main 4b1b526 (before signed ledgers):
-- the oldest format: an unkeyed SHA-256 chain (no 'trained' column, no seal), two rounds.
-- Made by tests/common/data/make_legacy_ledgers.py; sqlite3 <file> .dump
PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES('schema_version','1');
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
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE
);
INSERT INTO entries VALUES(1,'old-run',1,1690000000.0,1.5,0.25,4,1.0,1.0000000000000000817e-05,'poisson',0,'pld/replace-one','dp-accounting-0.6.0','{}',64,'eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee',2.9707273792221595698,'0000000000000000000000000000000000000000000000000000000000000000','c459489b243b78faab763cc87326e706a4beeff17686ef6125e72a5bf71862b5');
INSERT INTO entries VALUES(2,'old-run',2,1690000100.0,1.5,0.25,4,1.0,1.0000000000000000817e-05,'poisson',0,'pld/replace-one','dp-accounting-0.6.0','{}',64,'eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee',4.2109993986180951353,'c459489b243b78faab763cc87326e706a4beeff17686ef6125e72a5bf71862b5','99fbf55da3f98969799ece1e37247e3ee8d7fd819c8cfdfd88bbe78080e6c7a9');
CREATE TABLE caps (
    seq INTEGER PRIMARY KEY,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    created_at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: UPDATE refused'); END;
CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: DELETE refused'); END;
CREATE TRIGGER caps_no_update BEFORE UPDATE ON caps
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: UPDATE refused'); END;
CREATE TRIGGER caps_no_delete BEFORE DELETE ON caps
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only: DELETE refused'); END;
COMMIT;
