"""Parsing nccl-tests logs: values read by hand from the files in tests/data/nccl, and each
row's own busbw/algbw columns as an independent check of the group size."""
from pathlib import Path

import pytest

from meshplan.hw_profiles.collective_model import bus_factor
from meshplan.calibration.nccl_tests import parse_nccl_tests_log
from meshplan.calibration.samples import COLLECTIVE_COLUMNS
from meshplan.core.errors import ProfileError

DATA = Path(__file__).parent / "data" / "nccl"
US = 1e-6

# file: (collective, group_size, ranks_per_node, rows, repeats, first (bytes, us), last (bytes, us))
EXPECTED = {
    "all_reduce_perf_8xA100.txt": ("all_reduce", 8, 8, 21, 20, (1024, 23.75), (2 ** 30, 8242.2)),
    "all_gather_perf_2x8xH100.txt": ("all_gather", 16, 8, 16, 20, (16384, 39.04),
                                     (2 ** 29, 12128)),
    "reduce_scatter_perf_mpirun.txt": ("reduce_scatter", 8, 4, 15, 50, (8192, 31.97),
                                       (2 ** 27, 5956.7)),
    "sendrecv_perf_2nodes.txt": ("send_recv", 2, 1, 19, 20, (1024, 18.14), (2 ** 28, 11112)),
    "alltoall_perf_8xH100_nocheck.txt": ("all_to_all", 8, 8, 14, 20, (8192, 29.63),
                                         (2 ** 26, 204.8)),
    "broadcast_perf_4xpcie.txt": ("broadcast", 4, 4, 15, 40, (4096, 14.64), (2 ** 26, 6170.9)),
    "all_reduce_perf_split_mask_rails.txt": ("all_reduce", 2, 1, 13, 20, (65536, 22.87),
                                             (2 ** 28, 5933.5)),
}


def _table_rows(path: Path) -> list[list[str]]:
    """The log's result rows, split by hand (independent of the parser)."""
    rows = []
    for line in path.read_text().splitlines():
        line = line.split(">:", 1)[-1]
        tokens = line.split()
        if len(tokens) == 13 and tokens[0].isdigit():
            rows.append(tokens)
    return rows


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parses_sample_logs(name):
    kind, n, per_node, count, repeats, first, last = EXPECTED[name]
    df = parse_nccl_tests_log(DATA / name)
    assert list(df.columns) == list(COLLECTIVE_COLUMNS)
    assert len(df) == count
    assert set(df["collective"]) == {kind}
    assert set(df["group_size"]) == {n} and set(df["ranks_per_node"]) == {per_node}
    assert set(df["repeats"]) == {repeats}
    assert df["time_std_s"].isna().all()
    for i, (size, time_us) in ((0, first), (-1, last)):
        assert df["message_bytes"].iloc[i] == size
        assert df["time_s"].iloc[i] == pytest.approx(time_us * US)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_group_size_matches_the_logs_bus_factor(name):
    df = parse_nccl_tests_log(DATA / name)
    rows = _table_rows(DATA / name)
    for (_, row), tokens in zip(df.iterrows(), rows):
        algbw, busbw = float(tokens[6]), float(tokens[7])
        if algbw >= 10:  # enough digits printed for a 1% check
            factor = bus_factor(row["collective"], row["group_size"])
            assert busbw / algbw == pytest.approx(factor, rel=0.01)
            # algbw = size / time (nccl-tests doc/PERFORMANCE.md), GB/s of bytes per us * 1e3.
            assert row["message_bytes"] / row["time_s"] / 1e9 == pytest.approx(algbw, rel=0.01)


def test_accepts_text_and_explicit_collective():
    text = (DATA / "all_gather_perf_2x8xH100.txt").read_text()
    with pytest.raises(ProfileError, match="which collective"):
        parse_nccl_tests_log(text)
    df = parse_nccl_tests_log(text, collective="all_gather")
    assert len(df) == 16 and df["time_s"].iloc[1] == pytest.approx(38.14 * US)


def _write(tmp_path, name, text) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_malformed_row_names_file_and_line(tmp_path):
    lines = (DATA / "all_reduce_perf_8xA100.txt").read_text().splitlines()
    lineno = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("4096 "))
    lines[lineno - 1] = lines[lineno - 1][:60]  # a row cut short, as by a crashed rank
    path = _write(tmp_path, "all_reduce_perf.txt", "\n".join(lines))
    with pytest.raises(ProfileError) as err:
        parse_nccl_tests_log(path)
    assert err.value.field == f"{path}:{lineno}"
    assert "size count type" in err.value.fix


def test_wrong_elements_are_refused(tmp_path):
    text = (DATA / "sendrecv_perf_2nodes.txt").read_text()
    row = next(line for line in text.splitlines() if line.strip().startswith("2048 "))
    bad = row[:-1] + "7"  # in-place #wrong = 7
    with pytest.raises(ProfileError, match="7 wrong elements"):
        parse_nccl_tests_log(_write(tmp_path, "sendrecv_perf.txt", text.replace(row, bad)))


def test_missing_device_lines_and_empty_logs(tmp_path):
    text = (DATA / "broadcast_perf_4xpcie.txt").read_text()
    no_ranks = "\n".join(line for line in text.splitlines() if "Rank" not in line)
    with pytest.raises(ProfileError, match="Rank"):
        parse_nccl_tests_log(_write(tmp_path, "broadcast_perf.txt", no_ranks))
    with pytest.raises(ProfileError, match="no nccl-tests result table"):
        parse_nccl_tests_log(_write(tmp_path, "all_reduce_perf.txt", "NCCL version 2.18\n"))
    with pytest.raises(ProfileError, match="cannot read"):
        parse_nccl_tests_log(tmp_path / "missing_all_reduce_perf.txt")


def test_uneven_nodes_are_refused(tmp_path):
    text = (DATA / "all_gather_perf_2x8xH100.txt").read_text()
    uneven = text.replace("Rank  7 Group  0 Pid 201337 on   h100-n01",
                          "Rank  7 Group  0 Pid 201337 on   h100-n02")
    assert uneven != text
    with pytest.raises(ProfileError, match="unevenly"):
        parse_nccl_tests_log(_write(tmp_path, "all_gather_perf.txt", uneven))


def test_unknown_collective_argument():
    with pytest.raises(ProfileError) as err:
        parse_nccl_tests_log(DATA / "all_reduce_perf_8xA100.txt", collective="allreduce")
    assert err.value.field == "collective"
