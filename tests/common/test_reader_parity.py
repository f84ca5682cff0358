"""One reader: training, ``site check`` and ``predict`` read the same files to the
same values, bit for bit, and accept and refuse the same files (issue 24).

Every file here is made by the test: PNGs (8- and 16-bit, RGB in a 1-channel
federation, odd sizes), BOM CSVs with extra, site and non-numeric cells, and DICOM
files built with pydicom from PneumoniaMNIST arrays (16-bit, rescale slope and
intercept, MONOCHROME1, a declared window, multi-frame).
"""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cli.main import main as cli_main
from common.data import decode
from common.data.decode import decode_dicom, decode_image
from common.data.readers import SiteDataError, own_site_data, scan
from common.data.schema import Schema
from common.data.sitecheck import Plan, check_site
from common.models.predict import read_inputs, records_from_csv
from tests.conftest import SHARED_DATA

PNEUMONIA = SHARED_DATA / "pneumoniamnist.npz"
CLASSES = ("normal", "pneumonia")


def _xrays(n: int = 8) -> np.ndarray:
    """Real chest X-rays (uint8, 28x28) from the shared PneumoniaMNIST copy."""
    if not PNEUMONIA.is_file():
        pytest.skip(f"{PNEUMONIA} not present")
    with np.load(PNEUMONIA) as npz:
        return npz["test_images"][:n]


def write_dicom(path, pixels: np.ndarray, *, photometric="MONOCHROME2", bits=16, slope=1.0,
                intercept=0.0, frames=1, patient="P001", signed=False, extra_tags=True):
    """A DICOM file built with pydicom (Secondary Capture, explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    if extra_tags:  # identifying tags a reader must never need
        ds.PatientName, ds.PatientBirthDate, ds.InstitutionName = "Doe^Jane", "19700101", "General"
    ds.PatientID = patient
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    if frames > 1:
        ds.NumberOfFrames = frames
        pixels = np.stack([pixels] * frames)
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _png(path, array: np.ndarray, mode: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _mixed_folder(root):
    """Every image kind a hospital folder holds, in two class folders."""
    x = _xrays(8)
    _png(root / "normal" / "a8.png", x[0])
    _png(root / "normal" / "b16.png", (x[1].astype(np.uint16) * 257))  # 16-bit, full range
    _png(root / "normal" / "c.jpg", x[2])
    rgb = np.stack([x[3], x[3] // 2, 255 - x[3]], axis=2)
    _png(root / "normal" / "d_rgb.png", np.asarray(Image.fromarray(rgb).resize((64, 64))))
    _png(root / "pneumonia" / "e_odd.png", np.asarray(Image.fromarray(x[4]).resize((13, 9))))
    write_dicom(root / "pneumonia" / "f.dcm", x[5].astype(np.uint16) * 16, bits=12)
    write_dicom(root / "pneumonia" / "g.dcm", x[6].astype(np.uint16), photometric="MONOCHROME1",
                bits=8, slope=2.0, intercept=-100.0)
    _png(root / "pneumonia" / "h.bmp", x[7])
    return root


def _training_values(spec: str, size: int, channels: int, schema=None) -> dict[str, np.ndarray]:
    """What a deployed site trains on, by file (the reader own_site_data calls)."""
    s = scan(spec, size=(size, size), channels=channels, classes=CLASSES, schema=schema)
    return dict(zip(s.ids, s.x, strict=True))


def _predict_values(root, size: int, channels: int, card=None) -> dict[str, np.ndarray]:
    data = read_inputs(root, channels=channels, size=(size, size), card=card)
    return dict(zip(data.ids, data.records, strict=True))


@pytest.mark.parametrize("size, channels", [(28, 1), (16, 1), (20, 3)])
def test_training_site_check_and_predict_read_every_image_kind_bit_for_bit(tmp_path, size,
                                                                          channels):
    root = _mixed_folder(tmp_path / "site")
    train = _training_values(f"imagefolder:{root}", size, channels)
    pred = _predict_values(root, size, channels)
    assert sorted(train) == sorted(pred) and len(train) == 8
    for name in train:
        assert train[name].dtype == pred[name].dtype == np.float32
        assert train[name].shape == pred[name].shape
        np.testing.assert_array_equal(train[name], pred[name], err_msg=name)
    # own_site_data (the training path) holds exactly those records
    data = own_site_data(f"imagefolder:{root}", site_id=0, holdout=0.25, seed=0,
                         classes=CLASSES, image_size=size, channels=channels)
    got = np.concatenate([data.train_x, data.holdout_x])
    want = np.stack(list(train.values()))
    assert sorted(map(bytes, got)) == sorted(map(bytes, want))
    schema = Schema.from_dict({"classes": list(CLASSES), "image-size": size,
                               "image-channels": channels})
    report = check_site(f"imagefolder:{root}", Plan(batch_size=2), schema=schema)
    assert report.ok, report.errors
    assert report.num_records == 8 and report.refused == 0


def test_a_16_bit_pixel_is_scaled_by_its_depth_never_saturated(tmp_path):
    img = np.full((4, 4), 4000, np.uint16)
    path = _png(tmp_path / "c" / "x.png", img)
    values, desc = decode_image(path)
    assert values[0, 0] == np.float32(4000 / 65535) and "I" in desc  # 0.061, not 1.0
    train = scan(f"imagefolder:{tmp_path}", size=(4, 4), channels=1)
    pred = read_inputs(tmp_path, channels=1, size=(4, 4))
    assert train.x[0, 0, 0] == pred.records[0, 0, 0] == np.float32(4000 / 65535)
    # A declared window maps raw values instead: [0, 4095] (a 12-bit detector)
    schema = Schema.from_dict({"classes": ["c", "d"], "image-window": [0, 4095]})
    windowed = scan(f"imagefolder:{tmp_path}", size=(4, 4), channels=1, schema=schema)
    card = {"schema": schema.to_dict()}
    assert windowed.x[0, 0, 0] == read_inputs(tmp_path, channels=1, size=(4, 4),
                                              card=card).records[0, 0, 0]
    assert windowed.x[0, 0, 0] == np.float32(4000 / 4095)


def test_dicom_modality_lut_monochrome1_window_and_depth(tmp_path):
    x = _xrays(1)[0].astype(np.uint16)
    plain = decode_dicom(write_dicom(tmp_path / "p.dcm", x, bits=8))[0]
    np.testing.assert_array_equal(plain, (x / 255.0).astype(np.float32))
    # MONOCHROME1: 0 is white, so the values are inverted
    inv = decode_dicom(write_dicom(tmp_path / "m1.dcm", x, bits=8, photometric="MONOCHROME1"))[0]
    np.testing.assert_allclose(inv, 1 - plain, atol=1e-6)
    # Rescale slope and intercept: the range the stored bits can hold, after the LUT
    lut = decode_dicom(write_dicom(tmp_path / "r.dcm", x, bits=8, slope=2, intercept=-100))[0]
    x = x.astype(np.int64)
    np.testing.assert_allclose(lut, ((2 * x - 100) - (-100)) / (2 * 255.0), atol=1e-6)
    # A declared window in modality units
    win = decode_dicom(write_dicom(tmp_path / "w.dcm", x, bits=8, slope=2, intercept=-100),
                       window=decode.Window(0, 200))[0]
    np.testing.assert_allclose(win, np.clip(2 * x - 100, 0, 200) / 200.0, atol=1e-6)
    # 16-bit and signed: CT-like values from -1024
    ct = decode_dicom(write_dicom(tmp_path / "ct.dcm", x * 8 - 1024, bits=16,
                                  signed=True))[0]
    np.testing.assert_allclose(ct, (x.astype(np.float64) * 8 - 1024 + 32768) / 65535, atol=1e-6)
    with pytest.raises(decode.RecordError, match=r"multi-frame DICOM \(3 frames\)"):
        decode_dicom(write_dicom(tmp_path / "mf.dcm", x, frames=3))
    with pytest.raises(decode.RecordError, match="not a DICOM file"):
        (tmp_path / "junk.dcm").write_bytes(b"not dicom at all" * 20)
        decode_dicom(tmp_path / "junk.dcm")


def test_dicom_reads_only_the_tags_it_names(tmp_path, monkeypatch):
    """Pixel data, the tags decoding and the transforms need, and PatientID only when
    the site declares it as the patient source; never a name, a birth date, a place."""
    asked = []
    real = pydicom.dcmread

    def spy(*args, **kw):
        asked.append(set(kw.get("specific_tags") or ["<everything>"]))
        return real(*args, **kw)

    monkeypatch.setattr(pydicom, "dcmread", spy)
    path = write_dicom(tmp_path / "c" / "x.dcm", _xrays(1)[0].astype(np.uint16), bits=8)
    allowed = set(decode.DICOM_PIXEL_TAGS) | set(decode.DICOM_TRANSFORM_TAGS)
    decode_dicom(path)
    assert asked[-1] <= allowed and "PatientID" not in asked[-1]
    scan(f"dicom:{tmp_path}")
    assert asked[-1] <= allowed
    s = scan(f"dicom:{tmp_path}?patient=dicom")
    assert asked[-1] <= allowed | {"PatientID"} and "PatientID" in asked[-1]
    assert s.patients.tolist() == ["P001"]
    ds = real(path, specific_tags=sorted(asked[-1]))
    assert "PatientName" not in ds and "PatientBirthDate" not in ds


def test_a_dicom_folder_checks_trains_and_predicts(tmp_path, capsys):
    """``dicom:<dir>`` through site check (CLI), the site's training round and predict."""
    # lazy-free: these are the real site path and the real predictor
    from client.round import train_round
    from client.settings import deployed_policy
    from common import protocol
    from common.models.heads import head_state, make_head

    x = _xrays(24)
    root = tmp_path / "dcm"
    for i, img in enumerate(x):
        cls = CLASSES[i % 2]
        write_dicom(root / cls / f"P{i // 2:03d}" / f"img{i}", img.astype(np.uint16) * 16, bits=12,
                    patient=f"P{i // 2:03d}")  # no suffix: dicom: reads every file
    spec = f"dicom:{root}?patient=dicom"
    assert cli_main(["site", "check", "--data", spec, "--batch-size", "4", "--rounds", "2",
                     "--cap", "2", "--class-names", ",".join(CLASSES)]) == 0
    out = capsys.readouterr().out
    assert "24 usable records" in out and "patients: 12" in out and "P00" not in out
    settings = deployed_policy({
        "data-path": spec, "ledger-path": str(tmp_path / "l.sqlite"),
        "cache-dir": str(tmp_path / "c"), "target-epsilon": 2.0, "target-delta": 1e-5,
        "holdout": 0.25, "class-names": ",".join(CLASSES), "image-size": 28,
        "backbone": "identity"})
    schema = Schema.from_dict({"classes": list(CLASSES), "image-size": 28, "image-channels": 1})
    req = protocol.RoundRequest(run_id="r", server_round=1, num_rounds=1, local_epochs=1,
                                batch_size=4, learning_rate=1.0, momentum=0.0, clip_norm=1.0,
                                noise_multiplier=0.0, schema=schema.to_json(), backbone="identity")
    reply = train_round(settings, req, head_state(make_head("linear", in_dim=784,
                                                            num_classes=2)))
    assert reply.public.num_examples == 18  # 24 records, 3 of 12 patients held out whole
    data = own_site_data(spec, site_id=0, holdout=0.25, seed=0, classes=CLASSES, image_size=28)
    assert not set(data.train_groups) & set(data.holdout_groups)
    pred = read_inputs(f"dicom:{root}", channels=1, size=(28, 28))
    train = _training_values(spec, 28, 1)
    for name, values in zip(pred.ids, pred.records, strict=True):
        np.testing.assert_array_equal(values, train[name])


def _csv_schema():
    return Schema.from_dict({"classes": ["no", "yes"], "label": "outcome", "scaling": "declared",
                             "features": [{"name": "age", "center": 50.0, "scale": 10.0},
                                          {"name": "bp", "center": 120.0, "scale": 15.0,
                                           "lower": 80.0, "upper": 200.0},
                                          {"name": "sex", "kind": "categorical",
                                           "levels": ["f", "m"]}]})


CSV_CASES = {
    # name: (text, accepted)
    "plain": ("age,bp,sex,outcome\n51,130,m,yes\n40,250,f,no\n", True),
    "bom": ("\ufeffage,bp,sex,outcome\n51,130,m,yes\n40,118.5,f,no\n", True),
    "reordered+id": ("id,sex,outcome,bp,age\nr1,m,yes,130,51\nr2,f,no,99,40\n", True),
    "site column": ("age,bp,sex,hospital,outcome\n51,130,m,A,yes\n40,118,f,B,no\n", True),
    "extra column": ("age,bp,sex,ward,outcome\n51,130,m,north,yes\n40,118,f,south,no\n", False),
    "case-changed": ("Age,bp,sex,outcome\n51,130,m,yes\n40,118,f,no\n", False),
    "non-numeric": ("age,bp,sex,outcome\n51,abc,m,yes\n40,118,f,no\n", False),
    "undeclared level": ("age,bp,sex,outcome\n51,130,x,yes\n40,118,f,no\n", False),
    "missing": ("age,bp,sex,outcome\n51,,m,yes\n40,118,f,no\n", False),
    "short row": ("age,bp,sex,outcome\n51,130,m\n40,118,f,no\n", False),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_site_check_and_predict_accept_and_refuse_the_same_csv(tmp_path, case):
    text, accepted = CSV_CASES[case]
    path = tmp_path / "x.csv"
    path.write_text(text, encoding="utf-8")
    spec = f"csv:{path}" + ("?site=hospital" if case == "site column" else "")
    schema = _csv_schema()
    report = check_site(spec, Plan(batch_size=1), schema=schema)
    card = {"schema": schema.to_dict(), "classes": list(schema.classes)}
    try:
        data = read_inputs(spec, card=card)
        predicted = True
    except ValueError:
        predicted = False
    assert (not [e for e in report.errors if "does not fit" not in e]) == accepted == predicted, \
        report.errors
    if accepted:  # and bit for bit the same values: site (scan, then the transform) and predict
        site = schema.transform(scan(spec, schema=schema).x)
        np.testing.assert_array_equal(site, data.records)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(["L", "I;16", "RGB", "dicom12", "dicom-m1"]),
       width=st.integers(3, 24), height=st.integers(3, 24), size=st.integers(4, 20),
       channels=st.sampled_from([1, 3]), seed=st.integers(0, 2 ** 16))
def test_any_image_reads_the_same_in_training_and_predict(tmp_path_factory, mode, width, height,
                                                          size, channels, seed):
    """Generated images of every kind and size: the training reader and predict agree
    bit for bit, and stay in [0, 1]."""
    root = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(seed)
    if mode == "L":
        _png(root / "a" / "x.png", rng.integers(0, 256, (height, width), dtype=np.uint8))
    elif mode == "I;16":
        _png(root / "a" / "x.png", rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode == "RGB":
        _png(root / "a" / "x.png", rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    else:
        write_dicom(root / "a" / "x.dcm", rng.integers(0, 4096, (height, width)), bits=12,
                    photometric="MONOCHROME1" if mode == "dicom-m1" else "MONOCHROME2")
    train = scan(f"imagefolder:{root}", size=(size, size), channels=channels).x[0]
    pred = read_inputs(root, channels=channels, size=(size, size)).records[0]
    np.testing.assert_array_equal(train, pred)
    assert train.shape == ((size, size) if channels == 1 else (size, size, 3))
    assert 0.0 <= train.min() and train.max() <= 1.0


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.one_of(st.floats(-1e6, 1e6, allow_nan=False),
                                         st.sampled_from(["", "NA", "abc", "1e3", " 7 "])),
                               st.sampled_from(["f", "m", "x", ""]),
                               st.sampled_from(["yes", "no"])), min_size=1, max_size=12),
       bom=st.booleans())
def test_any_csv_reads_the_same_in_site_check_and_predict(tmp_path_factory, rows, bom):
    """Generated CSVs (numbers, missing tokens, text, undeclared levels, a BOM): the
    rows a site accepts are exactly the rows predict reads, to the same values."""
    path = tmp_path_factory.mktemp("csv") / "x.csv"
    body = "".join(f"{a if isinstance(a, str) else repr(a)},130,{s},{y}\n" for a, s, y in rows)
    path.write_text(("\ufeff" if bom else "") + "age,bp,sex,outcome\n" + body, encoding="utf-8")
    schema = _csv_schema()
    site = scan(f"csv:{path}", schema=schema)
    ids, x, statuses = records_from_csv(path, {"schema": schema.to_dict()})
    ok_rows = [f"x.csv, row {i + 2}" for i, s in enumerate(statuses) if s == "ok"]
    assert site.ids == ok_rows
    np.testing.assert_array_equal(schema.transform(site.x), x)
    assert site.refused == len(rows) - len(ok_rows)


def test_a_bad_image_is_refused_by_site_check_and_predict_alike(tmp_path):
    root = _mixed_folder(tmp_path / "site")
    (root / "normal" / "z.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    write_dicom(root / "pneumonia" / "mf.dcm", _xrays(1)[0].astype(np.uint16), frames=2)
    report = check_site(f"imagefolder:{root}", Plan(batch_size=2))
    assert not report.ok and report.refused == 2 and report.num_records == 8
    assert any("file pneumonia/mf.dcm: multi-frame DICOM (2 frames)" in e for e in report.errors)
    with pytest.raises(ValueError) as err:
        read_inputs(root, channels=1, size=(28, 28))
    assert "file pneumonia/mf.dcm: multi-frame DICOM (2 frames)" in str(err.value)
    assert "file normal/z.png" in str(err.value)
    with pytest.raises(SiteDataError, match="multi-frame"):
        own_site_data(f"imagefolder:{root}", site_id=0, holdout=0.2, seed=0, classes=CLASSES)


def test_patient_sources_group_records_and_the_holdout_splits_by_patient(tmp_path):
    x = _xrays(20)
    root = tmp_path / "img"
    for i, img in enumerate(x):
        _png(root / CLASSES[i % 2] / f"pt{i % 5}" / f"pt{i % 5}_scan{i}.png", img)
    (tmp_path / "manifest.csv").write_text("file,patient\n" + "".join(
        f"{CLASSES[i % 2]}/pt{i % 5}/pt{i % 5}_scan{i}.png,M{i % 5}\n" for i in range(20)))
    for source in ("folder", "name:^(pt%5Cd)_", f"manifest:{tmp_path / 'manifest.csv'}"):
        s = scan(f"imagefolder:{root}?patient={source}")
        assert len(set(s.patients.tolist())) == 5, source
        data = own_site_data(f"imagefolder:{root}?patient={source}", site_id=0, holdout=0.2,
                             seed=3, classes=CLASSES, image_size=28)
        assert not set(data.train_groups) & set(data.holdout_groups)
        assert len(data.train_y) + len(data.holdout_y) == 20
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("age,pid,label\n" + "".join(f"{i},{i % 4},{i % 2}\n" for i in range(16)))
    data = own_site_data(f"csv:{csv_path}?patient=column:pid", site_id=0, holdout=0.25, seed=0)
    assert not set(data.train_groups) & set(data.holdout_groups)
    assert data.train_x.shape[1] == 1  # the patient column is never a feature
    with pytest.raises(SiteDataError, match="patient=name"):
        scan(f"imagefolder:{root}?patient=name:nogroup")
    with pytest.raises(SiteDataError, match="a CSV's patient ids come from a column"):
        scan(f"csv:{csv_path}?patient=folder")
    # a record without a patient id is named (in the site's own log), never guessed
    _png(root / "normal" / "loose.png", x[0])
    s = scan(f"imagefolder:{root}?patient=folder")
    assert ("normal/loose.png", "not inside a patient folder (patient=folder: "
            "<dir>/<class>/<patient>/<image>)") in s.corrupt
    json.dumps(check_site(f"csv:{csv_path}?patient=column:pid", Plan(batch_size=2)).to_dict())
