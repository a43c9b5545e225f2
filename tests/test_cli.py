"""The ``gpuhnsw`` command line, end to end on siftsmall in a temporary folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpuhnsw
from gpuhnsw import cli, testing
from gpuhnsw.knn_graph import knn_graph

SIFT = testing.data_dir() / "siftsmall"
needs_sift = pytest.mark.usefixtures("siftsmall_folder")


def run(capsys, *argv):
    """main(argv) in-process: (exit status, stdout, stderr)."""
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def write_vecs(path, arr):
    """TEXMEX layout: per row an int32 dimension, then the row."""
    arr = np.asarray(arr)
    dims = np.full((arr.shape[0], 1), arr.shape[1], dtype="<i4")
    with open(path, "wb") as f:
        for row, d in zip(arr, dims):
            f.write(d.tobytes())
            f.write(row.tobytes())


@pytest.fixture(scope="module")
def siftsmall_folder(dataset_folder):
    """The siftsmall folder; skips (fails in CI) without it."""
    return dataset_folder("siftsmall")


@pytest.fixture(scope="module")
def sift_index_file(tmp_path_factory, siftsmall_folder):
    """siftsmall built once through the CLI (gpuhnsw format)."""
    path = tmp_path_factory.mktemp("cli") / "sift.idx"
    assert cli.main(["build", str(SIFT / "base.npy"), "-o", str(path), "--M", "12",
                     "--ef-construction", "100"]) == 0
    return path


@needs_sift
def test_build_query_recall(sift_index_file, tmp_path, capsys):
    status, _, err = run(capsys, "query", sift_index_file, SIFT / "queries.npy", "-k", 10, "--ef", 64,
                         "--labels", tmp_path / "L.npy", "--distances", tmp_path / "D.npy")
    assert status == 0, err
    labels, dists = np.load(tmp_path / "L.npy"), np.load(tmp_path / "D.npy")
    assert labels.shape == dists.shape == (100, 10)
    assert labels.dtype == np.uint64 and dists.dtype == np.float32
    assert testing.recall_at_k(labels, np.load(SIFT / "gt_l2.npy"), 10) >= 0.9
    base, queries = np.load(SIFT / "base.npy"), np.load(SIFT / "queries.npy")
    true = ((base[labels.astype(np.int64)].astype(np.float64) - queries[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(dists, true, rtol=1e-5)                # the distances of those labels


@needs_sift
def test_info(sift_index_file, capsys):
    status, out, _ = run(capsys, "info", sift_index_file)
    assert status == 0
    for field in ("format", "space", "dim", "count", "deleted", "M", "ef_construction", "levels"):
        assert field in out
    status, out, _ = run(capsys, "info", sift_index_file, "--json")
    info = json.loads(out)
    assert (info["format"], info["space"], info["dim"], info["count"]) == ("gpuhnsw", "l2", 128,
                                                                          10000)
    assert (info["deleted"], info["M"], info["ef_construction"]) == (0, 12, 100)
    assert sum(info["levels"].values()) == 10000 and info["levels"]["0"] > 9000


@needs_sift
def test_hnswlib_format_round_trip(tmp_path, capsys, hnswlib):
    path = tmp_path / "h.idx"
    status, _, err = run(capsys, "build", SIFT / "base.npy", "-o", path, "--format", "hnswlib",
                         "--limit", 3000, "--M", 8, "--ef-construction", 64, "--space", "ip")
    assert status == 0, err
    theirs = hnswlib.Index("ip", 128)
    theirs.load_index(str(path))
    assert theirs.get_current_count() == 3000
    status, out, _ = run(capsys, "info", path, "--json")
    info = json.loads(out)
    assert info["format"] == "hnswlib" and info["space"].startswith("unknown")
    assert info["count"] == 3000 and info["M"] == 8
    status, _, _ = run(capsys, "query", path, SIFT / "queries.npy", "-k", 5, "--space", "ip",
                       "--labels", tmp_path / "L.npy")
    assert status == 0
    want, _ = theirs.knn_query(np.load(SIFT / "queries.npy").astype(np.float32), k=5)
    assert testing.recall_at_k(np.load(tmp_path / "L.npy"), want, 5) >= 0.9


@needs_sift
def test_knn_graph_outputs(tmp_path, capsys):
    base = np.load(SIFT / "base.npy")[:2000].astype(np.float32)
    want, want_d = knn_graph(base, 8, method="exact")
    status, _, err = run(capsys, "knn-graph", SIFT / "base.npy", "--limit", 2000, "-k", 8,
                         "--method", "exact", "-o", tmp_path / "g.npz")
    assert status == 0, err
    with np.load(tmp_path / "g.npz") as z:
        assert z["format"].item() == b"csr" and tuple(z["shape"]) == (2000, 2000)
        np.testing.assert_array_equal(z["indices"].reshape(2000, 8), want)
        np.testing.assert_array_equal(z["data"].reshape(2000, 8), want_d)
        np.testing.assert_array_equal(z["indptr"], np.arange(0, 2000 * 8 + 1, 8))
    sparse = pytest.importorskip("scipy.sparse")
    m = sparse.load_npz(tmp_path / "g.npz")
    assert m.shape == (2000, 2000) and m.nnz == 16000
    status, _, _ = run(capsys, "knn-graph", SIFT / "base.npy", "--limit", 2000, "-k", 8,
                       "-o", tmp_path / "n.npy", "--distances", tmp_path / "d.npy",
                       "--method", "hnsw", "--ef", 50)
    assert status == 0
    assert testing.recall_at_k(np.load(tmp_path / "n.npy"), want, 8) >= 0.95
    assert np.load(tmp_path / "d.npy").shape == (2000, 8)
    # --method offered auto, exact and hnsw without help, although auto picks nndescent
    status, _, err = run(capsys, "knn-graph", SIFT / "base.npy", "--limit", 2000, "-k", 8,
                         "-o", tmp_path / "nd.npy", "--method", "nndescent")
    assert status == 0 and "method nndescent" in err, err
    assert testing.recall_at_k(np.load(tmp_path / "nd.npy"), want, 8) >= 0.95
    with pytest.raises(SystemExit):
        cli.main(["knn-graph", "--help"])
    helptext = capsys.readouterr().out
    assert "{auto,exact,nndescent,hnsw}" in helptext and "else nndescent" in helptext


@needs_sift
def test_bench_small(tmp_path, capsys):
    status, out, err = run(capsys, "bench", SIFT / "base.npy", "--queries", SIFT / "queries.npy",
                           "--gt", SIFT / "gt_l2.npy", "-k", 10, "--ef", "10,80",
                           "--M", 8, "--ef-construction", 64, "--json", tmp_path / "b.json",
                           "--plot", tmp_path / "b.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # refused before any work, with the reason
        assert status == 2 and "--plot needs matplotlib" in err and not (tmp_path / "b.json").exists()
        status, out, err = run(capsys, "bench", SIFT / "base.npy", "--queries", SIFT / "queries.npy",
                               "--gt", SIFT / "gt_l2.npy", "-k", 10, "--ef", "10,80",
                               "--M", 8, "--ef-construction", 64, "--json", tmp_path / "b.json")
    else:
        assert (tmp_path / "b.png").stat().st_size > 0
    assert status == 0, err
    assert "recall@10" in out and "QPS" in out
    result = json.loads((tmp_path / "b.json").read_text())
    assert [r["ef"] for r in result["rows"]] == [10, 80]
    assert result["rows"][1]["recall"] >= 0.95
    assert result["rows"][1]["recall"] >= result["rows"][0]["recall"]
    # held-out queries and computed ground truth
    status, out, _ = run(capsys, "bench", SIFT / "base.npy", "--limit", 2000, "--n-queries", 50,
                         "--ef", "40", "--M", 8, "--ef-construction", 64)
    assert status == 0 and "exact search" in out


def test_vector_file_readers(tmp_path):
    rng = np.random.default_rng(0)
    f = rng.standard_normal((7, 5)).astype(np.float32)
    b = rng.integers(0, 256, (4, 9), dtype=np.uint8)
    i = rng.integers(0, 1000, (3, 6), dtype=np.int32)
    for name, arr in (("a.fvecs", f), ("a.bvecs", b), ("a.ivecs", i)):
        write_vecs(tmp_path / name, arr)
        got = cli.read_vectors(tmp_path / name)
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got, arr)
    np.testing.assert_array_equal(cli.read_vectors(tmp_path / "a.fvecs", limit=2), f[:2])
    blob = (tmp_path / "a.fvecs").read_bytes()
    bad = {
        "trunc.fvecs": blob[:-3],
        "tiny.fvecs": b"\x01\x00",
        "zero.fvecs": b"\x00\x00\x00\x00",
        "mixed.fvecs": blob[:24] + b"\x04\x00\x00\x00" + blob[28:] + b"\0" * 0,
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(cli.CLIError, match=name):
            cli.read_vectors(tmp_path / name)
    for name in ("x.txt", "missing.npy"):
        with pytest.raises(cli.CLIError):
            cli.read_vectors(tmp_path / name)
    np.save(tmp_path / "three.npy", np.zeros((2, 2, 2)))
    with pytest.raises(cli.CLIError, match="2-D"):
        cli.read_vectors(tmp_path / "three.npy")


def test_fvecs_build_and_bruteforce_index_info(tmp_path, capsys, make_data):
    data = make_data(300, 16)
    write_vecs(tmp_path / "d.fvecs", data)
    status, _, err = run(capsys, "build", tmp_path / "d.fvecs", "-o", tmp_path / "d.idx",
                         "--space", "cosine", "--threads", 1)
    assert status == 0, err
    assert json.loads(run(capsys, "info", tmp_path / "d.idx", "--json")[1])["space"] == "cosine"
    bf = gpuhnsw.BFIndex("ip", 16)
    bf.init_index(500)
    bf.add_items(data)
    bf.save_index(str(tmp_path / "bf.idx"))
    info = json.loads(run(capsys, "info", tmp_path / "bf.idx", "--json")[1])
    assert (info["kind"], info["space"], info["dim"], info["count"], info["max_elements"]) == (
        "bruteforce", "ip", 16, 300, 500)
    status, _, _ = run(capsys, "query", tmp_path / "bf.idx", tmp_path / "d.fvecs", "-k", 3,
                       "--labels", tmp_path / "L.npy")
    assert status == 0
    want, _ = bf.knn_query(data, k=3)
    np.testing.assert_array_equal(np.load(tmp_path / "L.npy"), want)


def test_info_counts_deleted_and_query_skips_them(tmp_path, capsys, make_data):
    data = make_data(200, 6)
    index = gpuhnsw.Index("l2", 6, device="cpu")
    index.init_index(250, M=8, ef_construction=50)
    index.add_items(data, np.arange(200) + 1000)
    for label in (1000, 1001, 1002):
        index.mark_deleted(label)
    index.save_index(str(tmp_path / "del.idx"))
    info = json.loads(run(capsys, "info", tmp_path / "del.idx", "--json")[1])
    assert (info["count"], info["deleted"], info["live"], info["max_elements"]) == (200, 3, 197, 250)
    np.save(tmp_path / "q.npy", data[:3])
    status, _, err = run(capsys, "query", tmp_path / "del.idx", tmp_path / "q.npy", "-k", 2,
                         "--labels", tmp_path / "L.npy")
    assert status == 0, err
    labels = np.load(tmp_path / "L.npy")
    assert not np.isin(labels, [1000, 1001, 1002]).any()


def test_bad_input_exits_2_with_one_line(tmp_path, capsys, make_data):
    np.save(tmp_path / "nan.npy", np.array([[1, 2], [np.nan, 0]], dtype=np.float32))
    np.save(tmp_path / "ok.npy", make_data(50, 2))
    (tmp_path / "junk.idx").write_bytes(b"not an index at all" * 10)
    assert cli.main(["build", str(tmp_path / "ok.npy"), "-o", str(tmp_path / "ok.idx")]) == 0
    blob = (tmp_path / "ok.idx").read_bytes()
    (tmp_path / "trunc.idx").write_bytes(blob[: len(blob) // 2])
    capsys.readouterr()
    cases = [
        ("build", tmp_path / "missing.npy", "-o", tmp_path / "x.idx"),
        ("build", tmp_path / "nan.npy", "-o", tmp_path / "x.idx"),
        ("info", tmp_path / "junk.idx"),
        ("info", tmp_path / "trunc.idx"),
        ("query", tmp_path / "trunc.idx", tmp_path / "ok.npy", "--labels", tmp_path / "l.npy"),
        ("query", tmp_path / "ok.idx", tmp_path / "ok.npy", "-k", 51, "--labels", tmp_path / "l.npy"),
        ("query", tmp_path / "ok.idx", tmp_path / "ok.npy", "--space", "ip", "--labels",
         tmp_path / "l.npy"),
        ("knn-graph", tmp_path / "ok.npy", "-k", 50, "-o", tmp_path / "g.npy"),
        ("bench", tmp_path / "ok.npy", "--ef", "1,x"),
    ]
    for argv in cases:
        status, out, err = run(capsys, *argv)
        assert status == 2, argv
        assert len(err.strip().splitlines()) == 1 and "error" in err, (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "x.idx").exists() and not (tmp_path / "l.npy").exists()


def test_device_cuda_without_gpu_is_a_clean_error(tmp_path, capsys, make_data):
    if gpuhnsw.device.arrays.cuda_status()[0]:
        pytest.skip("a GPU is present")
    np.save(tmp_path / "ok.npy", make_data(20, 4))
    status, _, err = run(capsys, "build", tmp_path / "ok.npy", "-o", tmp_path / "x.idx",
                         "--device", "cuda")
    assert status == 2 and "no GPU" in err


def test_module_entry_point(tmp_path):
    """``python -m gpuhnsw``: a bad file gives status 2 and one line, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(Path(gpuhnsw.__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "gpuhnsw", "info", str(tmp_path / "none.idx")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "none.idx" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gpuhnsw", "--version"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0 and gpuhnsw.__version__ in proc.stdout


@needs_sift
def test_footguns(sift_index_file, tmp_path, capsys):
    """Outputs named by their format, results printed without an output file, no silent l2."""
    status, _, err = run(capsys, "knn-graph", SIFT / "base.npy", "--limit", 500, "-k", 5, "-o", tmp_path / "g.csv")
    assert status == 2 and ".npz" in err and not (tmp_path / "g.csv").exists()
    status, _, err = run(capsys, "knn-graph", SIFT / "base.npy", "--limit", 500, "-k", 5, "-o", tmp_path / "g.npy")
    assert status == 0 and "(chosen by --method auto)" in err and "method auto " not in err, err
    status, _, err = run(capsys, "query", sift_index_file, SIFT / "queries.npy", "--labels", tmp_path / "L.txt")
    assert status == 2 and "*.npy" in err and not (tmp_path / "L.txt").exists()

    status, out, err = run(capsys, "query", sift_index_file, SIFT / "queries.npy", "-k", 3, "--limit", 4)
    assert status == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "query\tlabels\tdistances" and len(lines) == 5
    status, _, _ = run(capsys, "query", sift_index_file, SIFT / "queries.npy", "-k", 3, "--limit", 4,
                       "--labels", tmp_path / "L.npy", "--distances", tmp_path / "D.npy")
    labels, dists = np.load(tmp_path / "L.npy"), np.load(tmp_path / "D.npy")
    for i, line in enumerate(lines[1:]):
        row, lab, dist = line.split("\t")
        assert int(row) == i and [int(x) for x in lab.split(",")] == labels[i].tolist()
        np.testing.assert_allclose([float(x) for x in dist.split(",")], dists[i], rtol=1e-5)

    path = tmp_path / "h.bin"
    assert run(capsys, "build", SIFT / "base.npy", "--limit", 500, "-o", path, "--format", "hnswlib")[0] == 0
    for argv in (("query", path, SIFT / "queries.npy"), ("bench", SIFT / "base.npy", "--limit", 500, "--index", path)):
        status, _, err = run(capsys, *argv)
        assert status == 2 and "does not store its space: pass --space" in err, err


def test_cli_directory_output_negative_seed_and_negative_npy_shape_exit_2_without_traceback(tmp_path, make_data):
    """An output path that is a directory, --seed -1 and an .npy header with a negative shape or
    unbalanced brackets printed tracebacks (exit 1); now one line and exit status 2, as for the other bad inputs, and
    the directory is refused before any work."""
    np.save(tmp_path / "ok.npy", make_data(50, 4))
    blob = (tmp_path / "ok.npy").read_bytes()
    (tmp_path / "neg.npy").write_bytes(blob.replace(b"'shape': (50, 4)", b"'shape': (-5, 4)"))
    # unbalanced brackets: NumPy's header tokenizer raised tokenize.TokenError, printed as a traceback
    (tmp_path / "open.npy").write_bytes(blob.replace(b"'shape': (50, 4)", b"'shape': (50, 4 "))
    (tmp_path / "dir").mkdir()
    assert cli.main(["build", str(tmp_path / "ok.npy"), "-o", str(tmp_path / "ok.idx")]) == 0
    cases = [
        ("build", "ok.npy", "-o", "dir"),
        ("build", "ok.npy", "-o", "x.idx", "--seed", "-1"),
        ("build", "ok.npy", "-o", "x.idx", "--seed", str(2**64)),
        ("build", "neg.npy", "-o", "x.idx"),
        ("query", "ok.idx", "neg.npy", "--labels", "l.npy"),
        ("query", "ok.idx", "ok.npy", "--labels", "dir"),
        ("knn-graph", "ok.npy", "-k", "3", "-o", "dir"),
        ("knn-graph", "neg.npy", "-k", "3", "-o", "g.npy"),
        ("build", "open.npy", "-o", "x.idx"),
        ("query", "ok.idx", "open.npy", "--labels", "l.npy"),
    ]
    for argv in cases:  # a separate process: argparse errors exit through SystemExit
        proc = subprocess.run([sys.executable, "-m", "gpuhnsw", *argv], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and "error" in proc.stderr.strip().splitlines()[-1], argv
        assert sum("error" in line for line in proc.stderr.splitlines()) == 1, (argv, proc.stderr)
    assert sorted(os.listdir(tmp_path)) == ["dir", "neg.npy", "ok.idx", "ok.npy", "open.npy"]
    assert os.listdir(tmp_path / "dir") == []
