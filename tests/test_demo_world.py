"""Tests of the demo world: byte-identical archives, official member layouts, self-consistent annotations."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from sd4match.demo_world import DemoWorldSpec, make_demo_world, make_spair

SPAIR_CATS = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "train",
    "tvmonitor",
]
WILLOW_CLASSES = [
    "car(G)",
    "car(M)",
    "car(S)",
    "duck(S)",
    "motorbike(G)",
    "motorbike(M)",
    "motorbike(S)",
    "winebottle(M)",
    "winebottle(wC)",
    "winebottle(woC)",
]
PAIR_NAME = re.compile(r"^(\d{6})-(\d{4}_\d{6})-(\d{4}_\d{6}):([a-z]+)$")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The default demo world, generated once for the module."""
    return make_demo_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def spair(world: dict[str, Path]) -> dict[str, bytes]:
    """Regular files of the SPair archive by member name."""
    with tarfile.open(world["spair_archive"], "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.fixture(scope="module")
def pfpascal(world: dict[str, Path]) -> dict[str, bytes]:
    """Files of both PF-Pascal archives by member name."""
    out: dict[str, bytes] = {}
    for key in ("pfpascal_images_archive", "pfpascal_pairs_archive"):
        with zipfile.ZipFile(world[key]) as zf:
            out.update({n: zf.read(n) for n in zf.namelist() if not n.endswith("/")})
    return out


def _rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode())))


def test_same_spec_gives_byte_identical_files(world: dict[str, Path], tmp_path: Path) -> None:
    again = make_demo_world(tmp_path / "again")
    assert sorted(again) == sorted(world)
    assert [p.name for p in again.values()] == [
        "SPair-71k.tar.gz",
        "PF-dataset-PASCAL.zip",
        "pf-pascal_image_pairs.zip",
        "PF-dataset.zip",
        "test_pairs.csv",
    ]
    for key, path in world.items():
        assert _sha256(again[key]) == _sha256(path), key


def test_seed_changes_the_world(tmp_path: Path) -> None:
    small = {
        "spair_categories": ("cat",),
        "spair_images_per_split": (3, 2, 2),
        "spair_pairs_per_split": (2, 1, 1),
    }
    a = make_spair(tmp_path / "a", DemoWorldSpec(seed=0, **small))
    b = make_spair(tmp_path / "b", DemoWorldSpec(seed=0, **small))
    c = make_spair(tmp_path / "c", DemoWorldSpec(seed=1, **small))
    assert _sha256(a) == _sha256(b)
    assert _sha256(a) != _sha256(c)


def test_spair_archive_layout(world: dict[str, Path]) -> None:
    with tarfile.open(world["spair_archive"], "r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    files = [m.name for m in members if m.isfile()]
    assert all(m.isfile() or m.isdir() for m in members)
    assert all(m.mtime == members[0].mtime and m.uid == 0 and m.gid == 0 for m in members)
    seen: set[str] = set()
    for name in names:  # every directory entry comes before its content
        parent = name.rsplit("/", 1)[0]
        assert "/" not in name or parent in seen, name
        seen.add(name)
    assert {n.split("/")[0] for n in names} == {"SPair-71k"}
    assert {n.split("/")[1] for n in files} == {"JPEGImages", "ImageAnnotation", "PairAnnotation", "Layout"}
    for cat in SPAIR_CATS:
        jpgs = {n.split("/")[-1][:-4] for n in files if n.startswith(f"SPair-71k/JPEGImages/{cat}/")}
        jsons = {n.split("/")[-1][:-5] for n in files if n.startswith(f"SPair-71k/ImageAnnotation/{cat}/")}
        assert len(jpgs) == 3 + 2 + 3 and jpgs == jsons, cat
        assert all(re.fullmatch(r"20(0[7-9]|1[01])_\d{6}", s) for s in jpgs)
    for split, n_pairs in (("trn", 6), ("val", 2), ("test", 3)):
        pairs = [n for n in files if n.startswith(f"SPair-71k/PairAnnotation/{split}/")]
        assert len(pairs) == 18 * n_pairs
        stems = [p.split("/")[-1][: -len(".json")] for p in pairs]
        assert all(PAIR_NAME.match(s) for s in stems)
        assert sorted(int(s[:6]) for s in stems) == list(range(1, 18 * n_pairs + 1))
    layouts = sorted(n for n in files if n.startswith("SPair-71k/Layout/"))
    assert layouts == [
        f"SPair-71k/Layout/{size}/{s}.txt" for size in ("large", "small") for s in ("test", "trn", "val")
    ]
    assert len(files) == 144 + 144 + 18 * 11 + 6


def test_spair_layout_lists_the_pair_files(spair: dict[str, bytes]) -> None:
    for split, n_small in (("trn", 2), ("val", 1), ("test", 1)):  # ceil(n / 5) per category
        large = spair[f"SPair-71k/Layout/large/{split}.txt"].decode()
        small = spair[f"SPair-71k/Layout/small/{split}.txt"].decode().splitlines()
        assert large.endswith("\n")
        stems = sorted(
            n.split("/")[-1][:-5] for n in spair if n.startswith(f"SPair-71k/PairAnnotation/{split}/")
        )
        assert large.splitlines() == stems
        assert len(small) == 18 * n_small and set(small) <= set(stems)
        assert [PAIR_NAME.match(s).group(4) for s in large.splitlines()][:: len(stems) // 18] == SPAIR_CATS


def _spair_pairs(spair: dict[str, bytes]) -> list[tuple[str, dict]]:
    return [(n, json.loads(b)) for n, b in spair.items() if "/PairAnnotation/" in n]


def test_spair_pair_fields_match_the_real_files(spair: dict[str, bytes], shared_data: Path) -> None:
    real_dir = shared_data / "SPair-71k-mini"
    real_pair = json.loads(next((real_dir / "PairAnnotation" / "test").glob("*.json")).read_text())
    real_image = json.loads(next((real_dir / "ImageAnnotation").glob("*/*.json")).read_text())
    for name, data in ((n, d) for n, d in spair.items() if n.endswith(".json")):
        obj = json.loads(data)
        if "/PairAnnotation/" in name:
            assert list(obj) == list(real_pair), name
            assert {k: type(v) for k, v in obj.items()} == {k: type(v) for k, v in real_pair.items()}
        elif "/ImageAnnotation/" in name:
            assert list(obj) == list(real_image), name


def test_spair_pairs_are_consistent_with_image_annotations(spair: dict[str, bytes]) -> None:
    for name, pair in _spair_pairs(spair):
        split, stem = name.split("/")[2], name.split("/")[-1][:-5]
        pair_id, src_stem, trg_stem, cat = PAIR_NAME.match(stem).groups()
        assert split in ("trn", "val", "test")
        assert (pair["pair_id"], pair["filename"], pair["category"]) == (int(pair_id), stem, cat)
        assert (pair["src_imname"], pair["trg_imname"]) == (f"{src_stem}.jpg", f"{trg_stem}.jpg")
        src = json.loads(spair[f"SPair-71k/ImageAnnotation/{cat}/{src_stem}.json"])
        trg = json.loads(spair[f"SPair-71k/ImageAnnotation/{cat}/{trg_stem}.json"])
        shared = [k for k in src["kps"] if src["kps"][k] is not None and trg["kps"][k] is not None]
        assert pair["kps_ids"] == shared and len(shared) >= 3
        assert pair["src_kps"] == [src["kps"][k] for k in shared]
        assert pair["trg_kps"] == [trg["kps"][k] for k in shared]
        for side, anno in (("src", src), ("trg", trg)):
            jpeg = Image.open(io.BytesIO(spair[f"SPair-71k/JPEGImages/{cat}/{anno['filename']}"]))
            w, h = jpeg.size
            assert jpeg.mode == "RGB" and w != h and 160 <= min(w, h) and max(w, h) <= 320
            assert pair[f"{side}_imsize"] == [w, h, 3] == [anno["image_width"], anno["image_height"], 3]
            assert pair[f"{side}_bndbox"] == anno["bndbox"] and pair[f"{side}_pose"] == anno["pose"]
            x1, y1, x2, y2 = anno["bndbox"]
            assert 0 <= x1 < x2 <= w - 1 and 0 <= y1 < y2 <= h - 1
            assert all(0 <= x <= w - 1 and 0 <= y <= h - 1 for x, y in pair[f"{side}_kps"])
        assert pair["mirror"] == int(src["pose"] != trg["pose"])
        assert pair["truncation"] == src["truncated"] + 2 * trg["truncated"]
        assert pair["occlusion"] == src["occluded"] + 2 * trg["occluded"]
        assert pair["viewpoint_variation"] in (0, 1, 2) and pair["scale_variation"] in (0, 1, 2)


def test_spair_images_are_disjoint_between_splits(spair: dict[str, bytes]) -> None:
    images: dict[str, set[str]] = {"trn": set(), "val": set(), "test": set()}
    for name, pair in _spair_pairs(spair):
        images[name.split("/")[2]] |= {pair["src_imname"], pair["trg_imname"]}
    assert not (
        images["trn"] & images["val"] or images["trn"] & images["test"] or images["val"] & images["test"]
    )


def test_pfpascal_archives_layout(world: dict[str, Path], shared_data: Path) -> None:
    with zipfile.ZipFile(world["pfpascal_images_archive"]) as zf:
        names = zf.namelist()
    with zipfile.ZipFile(world["pfpascal_pairs_archive"]) as zf:
        lists = {n: zf.read(n).decode() for n in zf.namelist()}
    jpgs = {
        n.split("/")[-1][:-4] for n in names if n.startswith("PF-dataset-PASCAL/JPEGImages/") and n[-1] != "/"
    }
    mats = [n for n in names if n.startswith("PF-dataset-PASCAL/Annotations/") and n.endswith(".mat")]
    assert {n.split("/")[0] for n in names} == {"PF-dataset-PASCAL"}
    assert len(jpgs) == 4 * 6 and {m.split("/")[-1][:-4] for m in mats} == jpgs and len(mats) == 24
    assert sorted({m.split("/")[2] for m in mats}) == ["aeroplane", "car", "cat", "motorbike"]
    assert sorted(lists) == ["test_pairs.csv", "trn_pairs.csv", "val_pairs.csv"]
    real = shared_data / "pf-pascal-pairs"
    for split, real_name in (("trn", "train"), ("val", "val"), ("test", "test")):
        real_header = (real / f"{real_name}_pairs.csv").read_text().splitlines()[0]
        assert lists[f"{split}_pairs.csv"].splitlines()[0] == real_header


def test_pfpascal_lists(pfpascal: dict[str, bytes]) -> None:
    trn, val, test = (_rows(pfpascal[f"{s}_pairs.csv"]) for s in ("trn", "val", "test"))
    assert (len(trn), len(val), len(test)) == (4 * 6 * 2, 4 * 2, 4 * 3)
    assert sorted(r["flip"] for r in trn) == ["0"] * 24 + ["1"] * 24
    assert {r["flip"] for r in val} == {"0"}
    flips: dict[tuple[str, str], list[str]] = {}
    for r in trn:
        flips.setdefault((r["source_image"], r["target_image"]), []).append(r["flip"])
    assert all(sorted(f) == ["0", "1"] for f in flips.values())
    pairs = [set(flips), {(r["source_image"], r["target_image"]) for r in val}]
    pairs.append({(r["source_image"], r["target_image"]) for r in test})
    assert sum(len(p) for p in pairs) == len(set().union(*pairs)) == 4 * 11  # no pair in two splits
    assert [r["class"] for r in test] == ["1"] * 3 + ["7"] * 3 + ["8"] * 3 + ["14"] * 3  # protocol class ids
    for row in trn + val + test:
        for key in ("source_image", "target_image"):
            assert f"PF-dataset-PASCAL/JPEGImages/{Path(row[key]).name}" == row[key] and row[key] in pfpascal


def _pfpascal_mat(pfpascal: dict[str, bytes], image_path: str) -> dict[str, np.ndarray]:
    stem = Path(image_path).stem
    (name,) = [
        n for n in pfpascal if n.startswith("PF-dataset-PASCAL/Annotations/") and n.endswith(f"/{stem}.mat")
    ]
    return scipy.io.loadmat(io.BytesIO(pfpascal[name]))


def test_pfpascal_mat_files(pfpascal: dict[str, bytes]) -> None:
    n_with_nan = 0
    for name in (n for n in pfpascal if n.endswith(".mat")):
        mat = scipy.io.loadmat(io.BytesIO(pfpascal[name]))
        kps, bbox = mat["kps"], mat["bbox"]
        assert kps.dtype == np.float64 and kps.ndim == 2 and kps.shape[1] == 2 and kps.shape[0] >= 10
        assert np.array_equal(np.isnan(kps[:, 0]), np.isnan(kps[:, 1]))  # whole rows are NaN
        n_with_nan += int(np.isnan(kps).any())
        w, h = Image.open(io.BytesIO(pfpascal[f"PF-dataset-PASCAL/JPEGImages/{Path(name).stem}.jpg"])).size
        assert bbox.shape == (1, 4) and bbox.dtype == np.float64
        x1, y1, x2, y2 = bbox[0]
        assert 0 <= x1 < x2 <= w - 1 and 0 <= y1 < y2 <= h - 1
        vis = kps[~np.isnan(kps[:, 0])]
        assert ((vis >= 0) & (vis <= [w - 1, h - 1])).all()
    assert n_with_nan >= 1


def test_pfpascal_test_keypoints_match_mat_files(pfpascal: dict[str, bytes]) -> None:
    for row in _rows(pfpascal["test_pairs.csv"]):
        xa, ya, xb, yb = (np.array([float(v) for v in row[k].split(";")]) for k in ("XA", "YA", "XB", "YB"))
        src = _pfpascal_mat(pfpascal, row["source_image"])["kps"]
        trg = _pfpascal_mat(pfpascal, row["target_image"])["kps"]
        assert src.shape == trg.shape  # same class, same keypoint count
        shared = ~np.isnan(src[:, 0]) & ~np.isnan(trg[:, 0])
        assert len(xa) == len(ya) == len(xb) == len(yb) == shared.sum() >= 3
        np.testing.assert_allclose(np.stack([xa, ya], 1), src[shared], rtol=1e-13)
        np.testing.assert_allclose(np.stack([xb, yb], 1), trg[shared], rtol=1e-13)
        assert all(v == format(float(v), ".15g") for k in ("XA", "YA", "XB", "YB") for v in row[k].split(";"))


def test_pfwillow_archive_and_pairs(world: dict[str, Path]) -> None:
    with zipfile.ZipFile(world["pfwillow_images_archive"]) as zf:
        files = {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")}
    assert {n.split("/")[0] for n in files} == {"PF-dataset"}
    assert sorted({n.split("/")[1] for n in files}) == WILLOW_CLASSES
    rows = _rows(world["pfwillow_pairs_csv"].read_bytes())
    assert len(rows) == 10 * 3 * 2
    for cls in WILLOW_CLASSES:
        stems = sorted(
            Path(n).stem for n in files if n.startswith(f"PF-dataset/{cls}/") and n.endswith(".png")
        )
        mats = sorted(
            Path(n).stem for n in files if n.startswith(f"PF-dataset/{cls}/") and n.endswith(".mat")
        )
        assert len(stems) == 3 and stems == mats
        expected = [
            (f"PF-dataset/{cls}/{a}.png", f"PF-dataset/{cls}/{b}.png")
            for a, b in itertools.permutations(stems, 2)
        ]
        assert [(r["imageA"], r["imageB"]) for r in rows if f"/{cls}/" in r["imageA"]] == expected
    for row in rows:
        for side, key in (("A", "imageA"), ("B", "imageB")):
            pts = scipy.io.loadmat(io.BytesIO(files[row[key][:-4] + ".mat"]))["pts_coord"]
            assert pts.shape == (2, 10) and pts.dtype == np.float64
            coords = [[float(row[f"{axis}{side}{i}"]) for i in range(1, 11)] for axis in "XY"]
            assert np.array_equal(np.array(coords), pts)  # repr() round-trips exactly
            image = Image.open(io.BytesIO(files[row[key]]))
            assert image.format == "PNG" and image.mode == "RGB"
            assert ((pts >= 0) & (pts <= np.array([[image.width - 1], [image.height - 1]]))).all()


def test_pfwillow_header_matches_the_real_csv(world: dict[str, Path], shared_data: Path) -> None:
    real = (shared_data / "pf-willow" / "test_pairs.csv").read_text().splitlines()[0]
    ours = world["pfwillow_pairs_csv"].read_text().splitlines()[0]
    assert ours == real
    assert ours.split(",")[:3] == ["imageA", "imageB", "XA1"] and ours.split(",")[-1] == "YB10"


def test_pfwillow_header_without_real_data(world: dict[str, Path]) -> None:
    header = world["pfwillow_pairs_csv"].read_text().splitlines()[0].split(",")
    assert len(header) == 2 + 40
    assert header[2:12] == [f"XA{i}" for i in range(1, 11)] and header[12] == "YA1" and header[22] == "XB1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spair_categories": ("unicorn",)}, "spair_categories"),
        ({"spair_pairs_per_split": (7, 2, 3)}, "spair trn"),
        ({"pfpascal_pairs_per_split": (6, 2)}, "pfpascal_pairs_per_split"),
        ({"image_size_range": (320, 160)}, "image_size_range"),
        ({"seed": -1}, "seed"),
        ({"pfwillow_images_per_class": 1}, "pfwillow"),
    ],
)
def test_bad_spec_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DemoWorldSpec(**kwargs)


def test_too_few_shared_keypoints_is_a_clear_error(tmp_path: Path) -> None:
    spec = DemoWorldSpec(spair_categories=("cat",), min_shared_kps=99)
    with pytest.raises(ValueError, match=r"spair trn cat: only 0 of 6 pairs share >= 99"):
        make_spair(tmp_path, spec)
    assert not (tmp_path / "SPair-71k.tar.gz").exists()


def test_spec_from_config_overrides_and_rejects_unknown_fields():
    from sd4match.demo_world import spec_from_config

    spec = spec_from_config(
        {"seed": 3, "spec": {"spair_pairs_per_split": [6, 2, 2], "pfwillow_images_per_class": 2}}
    )
    assert spec.seed == 3 and spec.spair_pairs_per_split == (6, 2, 2) and spec.pfwillow_images_per_class == 2
    with pytest.raises(ValueError, match="demo_world.spec"):
        spec_from_config({"spec": {"spair_pairs": 1}})
