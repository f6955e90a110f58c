"""Right / left label maps, volumes, the shared measurements CSV and surface meshes.

The geometry tests draw a two-femur phantom in patient (RAS+) millimetres and
sample it on rotated, mirrored, permuted, anisotropic voxel grids: the answer
(which voxel is the right femur, where the surface lies) is known in world
coordinates, whatever the array order.
"""

from __future__ import annotations

import csv
import multiprocessing as mp

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from femur_core.analysis import (
    LEFT,
    MEASUREMENT_FIELDS,
    RIGHT,
    append_csv_rows,
    check_csv_header,
    measure,
    measurement_row,
    read_csv_rows,
    side_labels,
)
from femur_core.errors import InputError
from femur_core.volume import Volume


# ----------------------------------------------------------------------------- phantom
def _seg_dist(p: np.ndarray, a, b) -> np.ndarray:
    a, b = np.asarray(a, float), np.asarray(b, float)
    t = np.clip(((p - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
    return np.linalg.norm(p - (a + t[:, None] * (b - a)), axis=1)


def femur_inside(p: np.ndarray, side: int) -> np.ndarray:
    """A proximal femur in RAS+ mm: head, neck, greater trochanter, shaft; ``side`` RIGHT (+x) or LEFT."""
    s = 1.0 if side == RIGHT else -1.0
    head = np.array([s * 90.0, 0.0, 0.0])
    neck_end = np.array([s * 130.0, 5.0, -25.0])
    shaft_end = np.array([s * 138.0, 0.0, -120.0])
    return ((np.linalg.norm(p - head, axis=1) <= 24.0) | (_seg_dist(p, head, neck_end) <= 13.0)
            | (_seg_dist(p, neck_end + [s * 8, 0, 12], neck_end) <= 12.0) | (_seg_dist(p, neck_end, shaft_end) <= 15.0))


def grid_affine(rot_deg, spacing, perm=(0, 1, 2), flips=(1, 1, 1), centre=(0.0, 0.0, -40.0), shape=None):
    """Voxel -> RAS affine of a rotated, permuted, mirrored grid centred on ``centre``."""
    r = Rotation.from_euler("xyz", rot_deg, degrees=True).as_matrix()
    cols = r[:, list(perm)] * np.asarray(flips, float) * np.asarray(spacing, float)
    a = np.eye(4)
    a[:3, :3] = cols
    a[:3, 3] = np.asarray(centre) - cols @ ((np.asarray(shape) - 1) / 2.0)
    return a


def phantom(affine: np.ndarray, shape, sides=(RIGHT, LEFT)) -> tuple[Volume, dict[int, np.ndarray]]:
    idx = np.indices(shape).reshape(3, -1).T.astype(float)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    truth = {k: femur_inside(world, k).reshape(shape) for k in sides}
    mask = np.zeros(shape, np.uint8)
    for t in truth.values():
        mask[t] = 1
    return Volume(mask, affine, "phantom"), truth


GRIDS = [  # (rotation xyz deg, spacing mm, axis permutation, flips, shape)
    ((0, 0, 0), (2.0, 2.0, 5.2), (0, 1, 2), (1, 1, 1), (150, 40, 110)),         # plain RAS, thick slices
    ((0, 0, 0), (2.0, 5.2, 2.0), (0, 2, 1), (-1, -1, 1), (150, 110, 40)),       # L, I, P like the real scans
    ((20, -15, 35), (1.8, 4.0, 2.4), (2, 0, 1), (1, -1, -1), (130, 120, 90)),   # oblique, permuted, anisotropic
    ((-10, 30, 170), (4.5, 2.2, 2.2), (1, 2, 0), (-1, 1, 1), (60, 150, 140)),   # rotated ~180 deg about S
]


@pytest.mark.parametrize("rot,spacing,perm,flips,shape", GRIDS)
def test_side_labels_follow_patient_coordinates_not_array_order(rot, spacing, perm, flips, shape):
    aff = grid_affine(rot, spacing, perm, flips, shape=shape)
    mask, truth = phantom(aff, shape)
    assert truth[RIGHT].sum() > 500 and truth[LEFT].sum() > 500  # both femurs in view
    lab = side_labels(mask)
    assert lab.meta["side_method"] == "pair" and lab.meta["labels"] == [RIGHT, LEFT]
    assert np.array_equal(lab.data == RIGHT, truth[RIGHT])
    assert np.array_equal(lab.data == LEFT, truth[LEFT])
    assert np.array_equal(lab.affine, aff) and lab.data.dtype == np.uint8
    # the same scan stored with its array axes reversed (and the affine adjusted) gives the same femurs
    flipped = Volume(mask.data[::-1, :, ::-1].copy(), aff @ _flip_affine(shape, (0, 2)))
    lab2 = side_labels(flipped)
    assert np.array_equal(lab2.data, lab.data[::-1, :, ::-1])


def _flip_affine(shape, axes) -> np.ndarray:
    f = np.eye(4)
    for ax in axes:
        f[ax, ax] = -1
        f[ax, 3] = shape[ax] - 1
    return f


@pytest.mark.parametrize("side", [RIGHT, LEFT])
@pytest.mark.parametrize("rot,spacing,perm,flips,shape", GRIDS[1:3])
def test_single_hip_gets_one_label_of_the_correct_side(side, rot, spacing, perm, flips, shape):
    s = 1.0 if side == RIGHT else -1.0
    aff = grid_affine(rot, spacing, perm, flips, centre=(s * 115.0, 0.0, -40.0), shape=shape)
    mask, truth = phantom(aff, shape, sides=(side,))
    lab = side_labels(mask)
    assert lab.meta["side_method"] == "shape" and lab.meta["labels"] == [side]
    assert np.array_equal(lab.data == side, truth[side]) and not (lab.data == (RIGHT + LEFT - side)).any()
    assert abs(lab.meta["shape_offset_mm"]) > 5.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("hips", ["left", "right", "both"])
def test_side_labels_on_synthetic_scans(seed, hips):
    from femur_core.synthetic import make_subject

    _, mask = make_subject(seed, "tiny", hips=hips)
    lab = side_labels(mask)
    want = {"right": [RIGHT], "left": [LEFT], "both": [RIGHT, LEFT]}[hips]
    assert lab.meta["labels"] == want
    assert np.array_equal(lab.data > 0, mask.data > 0)  # every femur voxel labelled, nothing else
    if hips == "both":  # the right femur lies towards RAS +x of the left one
        xs = {k: (np.argwhere(lab.data == k) @ mask.affine[:3, :3].T)[:, 0].mean() for k in (RIGHT, LEFT)}
        assert xs[RIGHT] > xs[LEFT] + 50


def test_empty_mask_and_stray_components():
    aff = grid_affine((0, 0, 0), (2.0, 2.0, 5.2), shape=(150, 40, 110))
    mask, truth = phantom(aff, (150, 40, 110))
    empty = side_labels(mask.with_data(np.zeros_like(mask.data)))
    assert empty.meta["side_method"] == "empty" and not empty.data.any()
    data = mask.data.copy()
    data[140:143, 20:22, 60:62] = 1  # a small blob at the far right (RAS +x of the right femur)
    data[2:4, 20:22, 60:62] = 1      # and one at the far left
    lab = side_labels(mask.with_data(data))
    assert (lab.data[140:143, 20:22, 60:62] == RIGHT).all() and (lab.data[2:4, 20:22, 60:62] == LEFT).all()
    assert np.array_equal(lab.data[truth[RIGHT]], np.full(truth[RIGHT].sum(), RIGHT))


# ----------------------------------------------------------------------------- volumes
def test_measure_uses_the_voxel_volume_of_sheared_grids():
    aff = np.array([[0.8, 0.3, 0.0, 5], [0.0, 1.2, 0.0, -3], [0.0, 0.0, 4.0, 10], [0, 0, 0, 1]])
    data = np.zeros((10, 10, 10), np.uint8)
    data[:5, :4, :3] = RIGHT
    data[6:, 5:, 7:] = LEFT
    ms = measure(Volume(data, aff))
    vox_mm3 = 0.8 * 1.2 * 4.0  # |det|, not the product of the column norms
    assert [(m.side, m.voxels) for m in ms] == [("right", 60), ("left", 60)]
    assert ms[0].volume_ml == pytest.approx(60 * vox_mm3 / 1000) and ms[1].volume_ml == pytest.approx(60 * vox_mm3 / 1000)
    row = measurement_row("s1", Volume(data, aff, meta={"side_method": "pair"}), threshold=0.42, model="m.pt",
                          uncertainty=0.0123)
    assert row["femurs"] == "right+left" and row["right_voxels"] == 60 and row["total_voxels"] == 120
    assert float(row["total_ml"]) == pytest.approx(120 * vox_mm3 / 1000, abs=1e-3)
    assert row["threshold"] == "0.4200" and row["uncertainty"] == "0.01230" and set(row) == set(MEASUREMENT_FIELDS)


# ----------------------------------------------------------------------------- the shared CSV
def _append_worker(path: str, worker: int, n_rows: int) -> None:
    for i in range(n_rows):
        row = {k: "" for k in MEASUREMENT_FIELDS}
        row.update(scan=f"w{worker}_scan{i:03d}", model="x" * 2000, femurs="right", right_voxels=worker * 1000 + i)
        append_csv_rows(path, [row])


def test_csv_appends_from_several_processes_keep_every_row_whole(tmp_path):
    path = tmp_path / "m.csv"
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_append_worker, args=(str(path), w, 20)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    text = path.read_text()
    assert text.count("scan,input,femurs") == 1 and text.splitlines()[0].startswith("scan,")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 80
    assert sorted(r["scan"] for r in rows) == sorted(f"w{w}_scan{i:03d}" for w in range(4) for i in range(20))
    assert all(r["model"] == "x" * 2000 and int(r["right_voxels"]) % 1000 < 20 for r in rows)


def test_csv_refuses_a_foreign_table_and_keeps_it(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="other.csv.*header"):
        check_csv_header(path)
    with pytest.raises(InputError, match="other.csv.*header"):
        append_csv_rows(path, [{k: "" for k in MEASUREMENT_FIELDS}])
    assert path.read_text() == "a,b\n1,2\n"


def test_csv_rerun_rows_replace_and_torn_line_is_isolated(tmp_path):
    path = tmp_path / "m.csv"
    base = {k: "" for k in MEASUREMENT_FIELDS}
    append_csv_rows(path, [dict(base, scan="a", right_ml="1"), dict(base, scan="b", right_ml="2")])
    with path.open("a") as fh:
        fh.write("c,half a line")  # a writer killed mid-row
    append_csv_rows(path, [dict(base, scan="a", right_ml="3")])
    latest = {r["scan"]: r["right_ml"] for r in read_csv_rows(path)}
    assert latest["a"] == "3" and latest["b"] == "2"
    assert len(read_csv_rows(path, latest_per_scan=False)) == 4  # a, b, the torn row, a again


# ----------------------------------------------------------------------------- meshes
MESH_GRID = ((25, -40, 70), (0.9, 1.3, 3.5), (1, 0, 2), (1, -1, -1), (140, 110, 60))


@pytest.fixture(scope="module")
def mesh_case():
    from femur_core.mesh import surface_mesh

    rot, spacing, perm, flips, shape = MESH_GRID
    aff = grid_affine(rot, spacing, perm, flips, centre=(100.0, 0.0, -30.0), shape=shape)
    assert np.linalg.det(aff[:3, :3]) < 0  # a mirroring grid: the case that turns triangles inside out
    mask, _ = phantom(aff, shape, sides=(RIGHT,))
    lab = side_labels(mask)
    return lab, surface_mesh(lab, RIGHT), surface_mesh(lab, RIGHT, smooth_iterations=15)


def test_mesh_is_watertight_and_keeps_the_mask_volume(mesh_case):
    lab, mesh, smooth = mesh_case
    mask_mm3 = measure(lab)[0].volume_ml * 1000
    for m in (mesh, smooth):
        assert m.is_watertight and m.is_winding_consistent
        assert m.volume > 0  # outward normals
        assert m.volume == pytest.approx(mask_mm3, rel=0.03)
    assert smooth.volume == pytest.approx(mesh.volume, rel=1e-6)  # smoothing restores the volume


def test_mesh_vertices_lie_on_the_mask_boundary_in_world_mm(mesh_case):
    lab, mesh, smooth = mesh_case
    inv = np.linalg.inv(lab.affine)
    idx = mesh.vertices @ inv[:3, :3].T + inv[:3, 3]  # world -> voxel index
    frac = np.abs(idx - np.round(idx))
    half = np.isclose(frac, 0.5, atol=1e-4)
    assert (half.sum(axis=1) == 1).all() and np.allclose(frac[~half], 0, atol=1e-4)
    lo = np.floor(idx + 1e-6).astype(int)  # the two voxels the vertex lies between
    ax = np.argmax(half, axis=1)
    hi = np.round(idx).astype(int)
    hi[np.arange(len(idx)), ax] = lo[np.arange(len(idx)), ax] + 1
    lo2 = np.round(idx).astype(int)
    lo2[np.arange(len(idx)), ax] = lo[np.arange(len(idx)), ax]
    pad = np.pad(lab.data == RIGHT, 1)
    a = pad[tuple((lo2 + 1).T)]
    b = pad[tuple((hi + 1).T)]
    assert (a != b).all()  # one inside, one outside: the vertex is on the boundary
    # the smoothed surface stays within a voxel diagonal of the phantom's true surface
    vs = smooth.vertices[:: max(1, len(smooth.vertices) // 3000)]
    diag = float(np.linalg.norm(MESH_GRID[1]))
    inside_out = femur_inside(vs + 0.0, RIGHT)
    eps = [femur_inside(vs + d, RIGHT) for d in (np.eye(3) * diag).tolist() + (-np.eye(3) * diag).tolist()]
    near = np.zeros(len(vs), bool)
    for e in eps:
        near |= e != inside_out
    assert near.mean() > 0.98


def test_mesh_files_reload_with_the_same_surface(mesh_case, tmp_path):
    import trimesh

    from femur_core.errors import OutputExistsError
    from femur_core.mesh import save_mesh

    _, mesh, _ = mesh_case
    for ext in ("stl", "ply"):
        p = save_mesh(mesh, tmp_path / f"f.{ext}")
        back = trimesh.load(p, file_type=ext, process=True)
        assert back.is_watertight and back.volume == pytest.approx(mesh.volume, rel=1e-4)
        assert np.allclose(back.bounds, mesh.bounds, atol=1e-3)
        with pytest.raises(OutputExistsError):
            save_mesh(mesh, p)
    with pytest.raises(InputError, match="obj"):
        save_mesh(mesh, tmp_path / "f.obj")


def test_mesh_of_nothing_is_a_clear_error():
    from femur_core.mesh import surface_mesh

    with pytest.raises(InputError, match="no label 2 voxel"):
        surface_mesh(Volume(np.zeros((4, 4, 4), np.uint8), np.eye(4), "x.nii.gz"), LEFT)
